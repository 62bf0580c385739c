"""``imtl_g``: weights giving an update with equal projections on every row (IMTL-G)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _weighting
from ._spectral import _kept_eigenvalues


def _pinv_times(M: Tensor, d: Tensor) -> Tensor:
    """``M⁺ d`` for a Gramian ``M`` [m, m], inverting only the eigenvalues that
    ``_kept_eigenvalues`` keeps (so a rounding-level negative eigenvalue is dropped, where
    ``torch.linalg.pinv`` would invert it)."""
    eigenvalues, Q = torch.linalg.eigh(M)
    keep = _kept_eigenvalues(eigenvalues)
    inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, 1.0), 0.0)
    return Q @ (inverse * (Q.mT @ d))


@_weighting("imtl_g(G)")
def imtl_g(G: Tensor) -> Tensor:
    """Weights of IMTL-G: ``w ∝ G⁺ sqrt(diag(G))``, normalised to sum to 1.

    Liu et al. (2021), in the generalisation of arXiv:2406.16232 that allows linearly dependent
    rows: ``Jᵀw`` has the same projection onto every normalised row. ``G⁺`` is the pseudo-inverse
    on the numerical range of ``G``: eigenvalues below ``m * eps * λmax``, or below the size of the
    most negative eigenvalue (rounding error, since a Gramian is positive semi-definite), count as
    zero. ``G`` is normalised by its trace first, so the result is invariant to scaling ``G``.

    Not differentiable (like TorchJD's: the pseudo-inverse has no useful derivative where the rank
    changes); gradients flow but are not tested.

    Degenerate Gramians: when ``v = G⁺ sqrt(diag(G))`` sums to rounding level (``|sum(v)| <=
    m * eps * (sum|v| + sum sqrt(diag(G)))`` for ``G`` of unit trace), no normalisation exists and
    the weights are all zero; this is the case of a zero Gramian. A rank-1 ``G = u uᵀ`` gives
    ``u / sum(u)``. ``m = 1`` gives ``[1]``. A ``G`` whose trace is not positive counts as zero.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.

    Returns:
        Weights of shape ``S`` summing to 1 (or all zero, see above).

    Examples:
        >>> import torch
        >>> from torchgram.weightings import imtl_g
        >>> imtl_g(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        tensor([0.3333, 0.6667])
    """
    trace = torch.diagonal(G).sum()
    M = torch.where(trace > 0, G / torch.where(trace > 0, trace, 1.0), 0.0)
    d = torch.sqrt(torch.diagonal(M).clamp(min=0.0))
    v = _pinv_times(M, d)
    total = v.sum()
    rounding = M.shape[0] * torch.finfo(M.dtype).eps * (v.abs().sum() + d.sum())
    small = total.abs() <= rounding
    return torch.where(small, torch.zeros_like(v), v / torch.where(small, 1.0, total))
