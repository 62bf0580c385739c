"""``imtl_g``: weights giving an update with equal projections on every row (IMTL-G)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _to_matrix, _unflatten_weights


def imtl_g(G: Tensor) -> Tensor:
    """Weights of IMTL-G: ``w ∝ G⁺ sqrt(diag(G))``, normalised to sum to 1.

    Liu et al. (2021), in the generalisation of arXiv:2406.16232 that allows linearly dependent
    rows: ``Jᵀw`` has the same projection onto every normalised row. ``G⁺`` is the pseudo-inverse.

    Not differentiable (like TorchJD's: the pseudo-inverse has no useful derivative where the rank
    changes); gradients flow but are not tested. A zero Gramian, or any Gramian where the weights
    sum to less than 1e-12 in absolute value, gives zero weights.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.

    Returns:
        Weights of shape ``S`` summing to 1 (or all zero, see above).

    Example:
        >>> import torch
        >>> from torchgram.weightings import imtl_g
        >>> imtl_g(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        tensor([0.3333, 0.6667])
    """
    M, shape = _to_matrix(G, "imtl_g(G)")
    d = torch.sqrt(torch.diagonal(M).clamp(min=0.0))
    v = torch.linalg.pinv(M, hermitian=True) @ d
    total = v.sum()
    small = total.abs() < 1e-12
    w = torch.where(small, torch.zeros_like(v), v / torch.where(small, 1.0, total))
    return _unflatten_weights(w, shape)
