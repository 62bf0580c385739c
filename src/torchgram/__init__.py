"""torchgram: Gramians of Jacobians as a ``torch.func`` transform.

``gramian(fn, params, *args, batch_dim=0)`` returns ``J Jᵀ`` for the Jacobian ``J`` of fn's output
with respect to ``params``, without forming per-sample gradients; ``torchgram.weightings`` turns a
Gramian into the weights of Jacobian descent.
"""

from importlib.metadata import PackageNotFoundError, version

from torchgram import rules, weightings
from torchgram._cross import cross_gramian, cross_gramian_of
from torchgram._distributed import RankFailed
from torchgram._grads import set_grad
from torchgram._shapes import flatten
from torchgram._transform import gramian, gramian_of, jd_grad, vjp_and_gramian

try:
    __version__ = version("torchgram")
except PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "RankFailed",
    "__version__",
    "cross_gramian",
    "cross_gramian_of",
    "flatten",
    "gramian",
    "gramian_of",
    "jd_grad",
    "rules",
    "set_grad",
    "vjp_and_gramian",
    "weightings",
]
