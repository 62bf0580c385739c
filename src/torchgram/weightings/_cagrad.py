"""``cagrad``: Conflict-Averse Gradient descent, the best worst-case update near the mean."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _check_positive_int, _uniform, _weighting


def _project_simplex(y: Tensor) -> Tensor:
    """Euclidean projection of ``y`` [m] onto the probability simplex (sort-based, no branches)."""
    sorted_y, _ = torch.sort(y, descending=True)
    shifted = torch.cumsum(sorted_y, dim=-1) - 1.0
    k = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype, device=y.device)
    count = (sorted_y - shifted / k > 0).sum(dim=-1, keepdim=True)
    theta = shifted.gather(-1, count - 1) / count.to(y.dtype)
    return (y - theta).clamp(min=0.0)


def _solve_cagrad_dual(G: Tensor, sqrt_phi: Tensor, max_iters: int) -> Tensor:
    """``argmin_{w in simplex} wᵀG 1/m + sqrt_phi * sqrt(wᵀGw)`` by accelerated projected gradient.

    The step is ``1 / L`` with ``L = λmax (1 + sqrt_phi / sqrt(wᵀGw))``, the curvature at the
    current point, so it adapts to how close the hull of the rows comes to the origin.
    """
    m = G.shape[0]
    b = G.sum(dim=1) / m
    lam_max = torch.linalg.eigvalsh(G)[-1].clamp(min=torch.finfo(G.dtype).tiny)
    tiny = torch.finfo(G.dtype).eps * lam_max
    x = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
    y = x
    for k in range(max_iters):
        Gy = G @ y
        norm = torch.sqrt((y @ Gy).clamp(min=0.0) + tiny)
        grad = b + sqrt_phi * Gy / norm
        x_next = _project_simplex(y - grad / (lam_max * (1.0 + sqrt_phi / norm)))
        y = x_next + (k / (k + 3)) * (x_next - x)
        x = x_next
    return x


@_weighting("cagrad(G)")
def cagrad(G: Tensor, *, c: float = 0.5, norm_eps: float = 1e-4, max_iters: int = 500) -> Tensor:
    """Weights of CAGrad: ``w = 1/m + (sqrt(φ) / ||g_u||) u`` from the dual of CAGrad's problem.

    Liu et al. (2021), Algorithm 1: the update maximises the worst per-row improvement within a ball
    of radius ``c ||g_0||`` around the mean gradient ``g_0``. With ``G`` normalised by its trace,
    ``u = argmin_{u in simplex} uᵀG 1/m + sqrt(φ) ||g_u||`` where ``sqrt(φ) = c ||g_0||`` and
    ``||g_u||² = uᵀGu``; it is solved by ``max_iters`` accelerated projected gradient steps (TorchJD
    uses cvxpy). As in TorchJD, when ``||g_u|| < norm_eps`` (the mean is Pareto-stationary, e.g. a
    zero Gramian) the weights are all zero. ``c=0`` gives the mean.

    Not differentiable (an iterative solve through sorting); gradients flow but are not tested.
    Invariant to scaling ``G`` (up to the ``norm_eps`` threshold).

    Degenerate Gramians: a zero ``G`` gives zero weights (above). The norms are clamped at zero,
    so a rank-deficient or slightly indefinite ``G`` gives finite weights. ``m = 1`` gives
    ``[1 + c]`` (``[0]`` for a zero ``G``).

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        c: Radius of the ball around the mean gradient, relative to its norm (``>= 0``).
        norm_eps: Threshold on ``||g_u||`` (normalised) below which the weights are zero.
        max_iters: Number of projected gradient steps.

    Returns:
        Weights of shape ``S``.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import cagrad
        >>> cagrad(torch.tensor([[4.0, -1.0], [-1.0, 1.0]]), c=0.5)
        tensor([0.5000, 0.9330])
    """
    call = "cagrad(G)"
    _check_positive_int(max_iters, call, "max_iters")
    if not c >= 0 or not norm_eps >= 0:
        raise ValueError(f"{call}: expected c >= 0 and norm_eps >= 0, got c={c!r}, {norm_eps=!r}.")
    m = G.shape[0]
    if m == 0:  # no rows: the dual has no variable (and no largest eigenvalue)
        return _uniform(G)
    trace = torch.diagonal(G).sum()
    small = trace < norm_eps
    Gn = torch.where(small, torch.zeros_like(G), G / torch.where(small, 1.0, trace))
    sqrt_phi = c * torch.sqrt(Gn.sum().clamp(min=0.0)) / m
    u = _solve_cagrad_dual(Gn, sqrt_phi, max_iters)
    norm = torch.sqrt((u @ Gn @ u).clamp(min=0.0))
    w = _uniform(G) + sqrt_phi / torch.where(norm >= norm_eps, norm, 1.0) * u
    return torch.where(norm >= norm_eps, w, torch.zeros_like(w))
