"""``pcgrad``: gradient surgery, projecting each row away from the rows it conflicts with."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _to_matrix, _unflatten_weights


def _permutations(m: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One random order of the ``m`` rows per row, drawn like TorchJD (one randperm per row)."""
    orders = [torch.randperm(m, generator=generator) for _ in range(m)]
    return torch.stack(orders).to(device)


def pcgrad(G: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Weights of PCGrad: each row, projected in a random order onto the normal planes of the rows
    it conflicts with, then summed.

    Yu et al. (2020), Algorithm 1. All rows are processed together: step ``t`` handles the ``t``-th
    row of each row's random order, so the cost is ``m`` products with ``G``. With the same seed of
    torch's global generator, the random orders are those of TorchJD's ``PCGradWeighting``.

    Not differentiable (the projections are decided by signs). Under ``vmap`` use
    ``randomness="same"`` (or ``"different"``) and ``generator=None``. Rows with a zero gradient
    (zero diagonal entry) are never projected onto; a zero Gramian gives all-ones weights.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        generator: The random number generator for the orders; ``None`` uses torch's global one.

    Returns:
        Weights of shape ``S``.

    Example:
        >>> import torch
        >>> from torchgram.weightings import pcgrad
        >>> pcgrad(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
        tensor([1.5000, 1.5000])
    """
    M, shape = _to_matrix(G, "pcgrad(G)")
    m = M.shape[0]
    orders = _permutations(m, generator, M.device)
    rows = torch.arange(m, device=M.device)
    C = torch.eye(m, dtype=M.dtype, device=M.device)
    diagonal = torch.diagonal(M)
    for t in range(m):
        j = orders[:, t]
        inner = (M[j] * C).sum(dim=1)  # <current projected row i, row j_i>
        safe = torch.where(diagonal[j] > 0, diagonal[j], 1.0)
        step = torch.where((inner < 0) & (j != rows) & (diagonal[j] > 0), inner / safe, 0.0)
        C = C - step.unsqueeze(1) * torch.nn.functional.one_hot(j, m).to(M.dtype)
    return _unflatten_weights(C.sum(dim=0), shape)
