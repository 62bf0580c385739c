"""``gradvac``: Gradient Vaccine, a stateful weighting steering pairwise cosines to their EMA."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._shapes import _check_in_range, _weighting
from ._sweep import Rule, _sweep


class GradVacState(NamedTuple):
    """State of ``gradvac`` between calls.

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


def _vaccine(G: Tensor, orders: Tensor, phi: Tensor, beta: float, eps: float) -> Rule:
    """The rule of the sweep (see ``_sweep.py``) for row ``i`` meeting row ``j``.

    The carry is ``|g_i|²`` of the rows so far; the output is the move ``beta * (cosine - φ̂_ij)``
    of the target. Each ``φ̂_ij`` is read and moved once per call, so the targets are read
    from ``phi`` up front.
    """
    squared_norms = torch.diagonal(G)[orders]
    norms_j = squared_norms.clamp(min=0.0).sqrt()
    targets = phi.gather(1, orders)

    def step(dot: Tensor, t: int, squared_norm_i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        norm_i = squared_norm_i.clamp(min=0.0).sqrt()
        norm_j, target = norms_j[:, t], targets[:, t]
        cosine = dot / (norm_i * norm_j + eps)
        sin_cosine = (1.0 - cosine * cosine).clamp(min=0.0).sqrt()
        sin_target = (1.0 - target * target).clamp(min=0.0).sqrt()
        correction = (
            norm_i * (target * sin_cosine - cosine * sin_target) / (norm_j * sin_target + eps)
        )
        correction = torch.where(cosine < target, correction, 0.0)
        # |g_i + c g_j|² = |g_i|² + c (2 <g_i, g_j> + c |g_j|²)
        squared_norm_i = squared_norm_i + correction * (
            2.0 * dot + correction * squared_norms[:, t]
        )
        return correction, squared_norm_i, beta * (cosine - target)

    return step


@_weighting("gradvac(G)")
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
    Everything is computed from ``G``. Rows are processed together (``m - 1`` steps, see
    ``_sweep.py``), with the random orders TorchJD's ``GradVacWeighting`` draws from the same seed
    of the global generator.

    Stateful: ``w, state = gradvac(G, state=state)``; ``state=None`` starts from zero targets.
    Not differentiable (the corrections are decided by comparisons). Under ``vmap`` use
    ``randomness="same"`` and ``generator=None``. For a float16 or bfloat16 ``G`` the state is
    kept in float32.

    Degenerate Gramians: a correction is proportional to ``|g_i|``, so a zero ``G`` gives all-ones
    weights; with ``state=None``, a rank-1 ``G = u uᵀ`` with ``u > 0`` (cosines 1) gives all ones
    too; ``m = 1`` gives ``[1]`` and leaves the state as it was. Norms are clamped at zero, so a
    slightly indefinite ``G`` gives finite weights.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        state: The state returned by the previous call, or ``None``.
        beta: EMA rate of the targets, in ``[0, 1]``.
        eps: Added to denominators.
        generator: The random number generator for the orders; ``None`` uses torch's global one.

    Returns:
        The weights, of shape ``S``, and the new ``GradVacState``.

    Raises:
        ValueError: If ``beta`` is outside ``[0, 1]``, ``eps < 0`` or the state has the wrong shape.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import gradvac
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
        >>> w, state = gradvac(G)
        >>> w
        tensor([1.5000, 1.5000])
        >>> w, state = gradvac(G, state=state)
    """
    call = "gradvac(G)"
    _check_in_range(beta, 0.0, 1.0, call, "beta")
    if eps < 0:
        raise ValueError(f"{call}: expected eps >= 0, got {eps!r}.")
    m = G.shape[0]
    if state is None:
        phi = torch.zeros(m, m, dtype=G.dtype, device=G.device)
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
        phi = state.phi.to(G.dtype)
    if m == 0:
        return G.new_zeros(0), GradVacState(phi)
    orders = _orders(m, generator, G.device)
    rule = _vaccine(G, orders, phi, beta, eps)
    C, _, moves = _sweep(G, orders, rule, torch.diagonal(G))
    return C.sum(dim=0), GradVacState(phi.scatter_add(1, orders, moves))
