"""``pcgrad``: gradient surgery, projecting each row away from the rows it conflicts with."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _weighting
from ._sweep import _sweep


def _permutations(m: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One random order of the ``m`` rows per row, drawn like TorchJD (one randperm per row)."""
    orders = [torch.randperm(m, generator=generator) for _ in range(m)]
    return torch.stack(orders).to(device)


@_weighting("pcgrad(G)")
def pcgrad(G: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Weights of PCGrad: each row, projected in a random order onto the normal planes of the rows
    it conflicts with, then summed.

    Yu et al. (2020), Algorithm 1. All rows are processed together: step ``t`` handles the ``t``-th
    row of each row's random order (see ``_sweep.py``). With the same seed of torch's global
    generator, the random orders are those of TorchJD's ``PCGradWeighting``.

    Not differentiable (the projections are decided by signs). Under ``vmap`` use
    ``randomness="same"`` (or ``"different"``) and ``generator=None``.

    Degenerate Gramians: rows with a zero gradient (a diagonal entry ``<= 0``, negative only by
    rounding) are never projected onto, so a zero ``G`` gives all-ones weights; a rank-1
    ``G = u uᵀ`` with ``u > 0`` has no conflict and gives all ones too, as does ``m = 1``.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        generator: The random number generator for the orders; ``None`` uses torch's global one.

    Returns:
        Weights of shape ``S``.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import pcgrad
        >>> pcgrad(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
        tensor([1.5000, 1.5000])
    """
    m = G.shape[0]
    if m == 0:
        return G.new_zeros(0)
    orders = _permutations(m, generator, G.device)
    squared_norms = torch.diagonal(G)[orders]  # |g_j|² of the row met at each step
    projectable = (orders != torch.arange(m, device=G.device).unsqueeze(1)) & (squared_norms > 0)

    def project(inner: Tensor, t: int, carry: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        conflict = (inner < 0) & projectable[:, t]
        norms = torch.where(projectable[:, t], squared_norms[:, t], 1.0)
        coefficient = torch.where(conflict, -inner / norms, 0.0)
        return coefficient, carry, coefficient

    C, _, _ = _sweep(G, orders, project, G.new_zeros(()))
    return C.sum(dim=0)
