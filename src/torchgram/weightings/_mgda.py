"""``mgda``: the minimum-norm point of the convex hull of the rows (Frank-Wolfe solver)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _can_read, _check_positive_int, _uniform, _weighting


def _frank_wolfe_step(G: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """One Frank-Wolfe step with exact line search; returns the new weights and the step size."""
    Ga = G @ alpha
    t = torch.argmin(Ga)
    a = Ga[t]  # alphaᵀ G e_t
    b = alpha @ Ga  # alphaᵀ G alpha
    c = G[t, t]  # e_tᵀ G e_t
    ratio = (b - a) / torch.where(b + c - 2 * a > 0, b + c - 2 * a, 1.0)
    gamma = torch.where(c <= a, 1.0, torch.where(b <= a, 0.0, ratio))
    e_t = torch.nn.functional.one_hot(t, G.shape[0]).to(G.dtype)
    return (1 - gamma) * alpha + gamma * e_t, gamma


@_weighting("mgda(G)")
def mgda(G: Tensor, *, epsilon: float = 1e-3, max_iters: int = 100) -> Tensor:
    """Weights of MGDA: ``argmin_{w in simplex} wᵀGw``, the min-norm element of the rows' hull.

    Désidéri (2012); solved with the Frank-Wolfe method of Algorithm 2 of Sener and Koltun (2018),
    starting from uniform weights and stopping once a step is smaller than ``epsilon`` (as TorchJD
    does). Under ``vmap`` the stop is a mask, not a branch (all ``max_iters`` iterations run,
    the later ones without moving); elsewhere the loop ends there. ``Jᵀw`` does not conflict
    with any row: ``G w >= wᵀGw >= 0`` at the exact optimum.

    Differentiable almost everywhere (through the last active iterations, with the selected
    vertices treated as constant).

    Degenerate Gramians: a zero ``G`` gives ``e_0`` (every point is a minimiser; the first step
    goes to the first vertex, as in TorchJD). On a rank-deficient one any minimiser may be
    returned; a rank-1 ``G = u uᵀ`` with ``u > 0`` gives ``e_k``, ``k = argmin_k u_k`` (one exact
    step). The step sizes stay in ``[0, 1]``, so a slightly indefinite ``G`` gives weights in the
    simplex too. ``m = 1`` gives ``[1]``.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        epsilon: Stop once the Frank-Wolfe step size is below this value.
        max_iters: Maximal number of Frank-Wolfe iterations.

    Returns:
        Weights of shape ``S``, non-negative and summing to 1.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import mgda
        >>> mgda(torch.tensor([[4.0, -1.0], [-1.0, 1.0]]))
        tensor([0.2857, 0.7143])
    """
    call = "mgda(G)"
    _check_positive_int(max_iters, call, "max_iters")
    if not epsilon > 0:
        raise ValueError(f"{call}: expected epsilon > 0, got {epsilon!r}.")
    alpha = _uniform(G)
    if G.shape[0] == 0:  # no vertex to step to
        return alpha
    done = torch.zeros((), dtype=torch.bool, device=G.device)
    can_stop = _can_read(G)  # outside vmap: stop once done (the later steps would not move)
    for _ in range(max_iters):
        candidate, gamma = _frank_wolfe_step(G, alpha)
        alpha = torch.where(done, alpha, candidate)
        done = done | (gamma < epsilon)
        if can_stop and bool(done):
            break
    return alpha
