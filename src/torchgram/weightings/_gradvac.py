"""``gradvac``: Gradient Vaccine, a stateful weighting steering pairwise cosines to their EMA."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._shapes import _check_in_range, _to_matrix, _unflatten_weights


class GradVacState(NamedTuple):
    """State of :func:`gradvac` between calls.

    Attributes:
        phi: ``[m, m]`` exponential moving averages of the pairwise cosine similarities (the
            targets ``φ̂_ij``), indexed by the flattened rows.
    """

    phi: Tensor


def _orders(m: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``[m, m-1]``: for each row ``i``, the other rows in a random order (one randperm per row, as
    TorchJD draws them)."""
    perms = torch.stack([torch.randperm(m - 1, generator=generator) for _ in range(m)])
    rows = torch.arange(m).unsqueeze(1)
    return (perms + (perms >= rows).long()).to(device)


def _vaccine_step(
    G: Tensor, C: Tensor, CG: Tensor, phi: Tensor, j: Tensor, beta: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Handles row ``j[i]`` for every row ``i`` at once; returns the new ``C``, ``CG``, ``phi``."""
    m = G.shape[0]
    one_hot = torch.nn.functional.one_hot(j, m).to(G.dtype)
    dot = (CG * one_hot).sum(dim=1)
    norm_i = (CG * C).sum(dim=1).clamp(min=0.0).sqrt()
    norm_j = torch.diagonal(G)[j].clamp(min=0.0).sqrt()
    cosine = dot / (norm_i * norm_j + eps)
    target = (phi * one_hot).sum(dim=1)
    sin_cosine = (1.0 - cosine * cosine).clamp(min=0.0).sqrt()
    sin_target = (1.0 - target * target).clamp(min=0.0).sqrt()
    correction = norm_i * (target * sin_cosine - cosine * sin_target) / (norm_j * sin_target + eps)
    correction = torch.where(cosine < target, correction, 0.0)
    C = C + correction.unsqueeze(1) * one_hot
    CG = CG + correction.unsqueeze(1) * G[j]
    phi = phi + one_hot * (beta * (cosine - target)).unsqueeze(1)
    return C, CG, phi


def gradvac(
    G: Tensor,
    *,
    state: GradVacState | None = None,
    beta: float = 0.5,
    eps: float = 1e-8,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, GradVacState]:
    """Weights of Gradient Vaccine and the updated state.

    Wang et al. (ICLR 2021). Each row ``g_i`` meets the other rows in a random order; when its
    cosine with ``g_j`` is below the target ``φ̂_ij``, ``g_j`` is added with the coefficient that
    lifts the cosine to the target; ``φ̂_ij`` then moves to the observed cosine with rate ``beta``.
    Everything is computed from ``G``. Rows are processed together (``m - 1`` steps), with the
    random orders TorchJD's ``GradVacWeighting`` draws from the same seed of the global generator.

    Stateful: ``w, state = gradvac(G, state=state)``; ``state=None`` starts from zero targets.
    Not differentiable (the corrections are decided by comparisons). Under ``vmap`` use
    ``randomness="same"`` and ``generator=None``. A zero Gramian gives all-ones weights.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        state: The state returned by the previous call, or ``None``.
        beta: EMA rate of the targets, in ``[0, 1]``.
        eps: Added to denominators.
        generator: The random number generator for the orders; ``None`` uses torch's global one.

    Returns:
        The weights, of shape ``S``, and the new :class:`GradVacState`.

    Raises:
        ValueError: If ``beta`` is outside ``[0, 1]``, ``eps < 0`` or the state has the wrong shape.

    Example:
        >>> import torch
        >>> from torchgram.weightings import gradvac
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
        >>> w, state = gradvac(G)
        >>> w
        tensor([1.5000, 1.5000])
        >>> w, state = gradvac(G, state=state)
    """
    call = "gradvac(G)"
    M, shape = _to_matrix(G, call)
    _check_in_range(beta, 0.0, 1.0, call, "beta")
    if eps < 0:
        raise ValueError(f"{call}: expected eps >= 0, got {eps!r}.")
    m = M.shape[0]
    if state is None:
        phi = torch.zeros(m, m, dtype=M.dtype, device=M.device)
    elif not isinstance(state, GradVacState):
        raise TypeError(
            f"{call}: expected state to be a GradVacState or None, got {type(state).__name__}. "
            "Pass the state returned by the previous call."
        )
    elif state.phi.shape != (m, m):
        raise ValueError(
            f"{call}: expected state.phi of shape [{m}, {m}], got {list(state.phi.shape)}. The "
            "number of rows changed: start again with state=None."
        )
    else:
        phi = state.phi.to(M.dtype)
    C = torch.eye(m, dtype=M.dtype, device=M.device)
    CG = M.clone()
    orders = _orders(m, generator, M.device)
    for t in range(m - 1):
        C, CG, phi = _vaccine_step(M, C, CG, phi, orders[:, t], beta, eps)
    return _unflatten_weights(C.sum(dim=0), shape), GradVacState(phi)
