"""torchgram: Gramians of Jacobians as a ``torch.func`` transform."""

from torchgram import weightings

__all__ = ["weightings"]
