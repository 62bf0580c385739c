"""``fairgrad`` and ``nash_mtl``: weights solving ``G w = w^(-1/alpha)`` (alpha-fair allocation)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _check_positive_int, _to_matrix, _unflatten_weights


def _solve_fair(G: Tensor, alpha: float, max_iters: int) -> Tensor:
    """Solves ``G w = w^(-1/alpha)``, ``w > 0`` by damped Newton steps.

    It is the stationarity condition of the strictly convex ``½wᵀGw - sum_i h(w_i)`` with
    ``h' = w^(-1/alpha)``. The start solves the diagonal part exactly; each step stays inside
    ``w > 0`` (fraction to the boundary 0.9).
    """
    power = -1.0 / alpha
    w = torch.diagonal(G).clamp(min=torch.finfo(G.dtype).tiny) ** (alpha / (-alpha - 1.0))
    for _ in range(max_iters):
        residual = G @ w - w**power
        jacobian = G + torch.diag_embed(-power * w ** (power - 1.0))
        step = -torch.linalg.solve(jacobian, residual)
        ratios = torch.where(step < 0, w / (-step).clamp(min=torch.finfo(G.dtype).tiny), torch.inf)
        w = w + (0.9 * ratios.amin()).clamp(max=1.0) * step
    return w


def fairgrad(G: Tensor, *, alpha: float = 1.0, max_iters: int = 50) -> Tensor:
    """Weights of FairGrad: the positive solution of ``G w = w^(-1/alpha)``.

    Ban and Ji (2024), Equation 4: the update maximises the alpha-fair utility of the per-row
    improvements. ``alpha=1`` is proportional fairness (the Nash bargaining solution of
    :func:`nash_mtl`), ``alpha -> inf`` approaches max-min fairness; ``alpha=0`` gives uniform
    weights ``1/m`` (as in TorchJD). Solved by ``max_iters`` damped Newton steps (an ``[m, m]``
    solve each; quadratic convergence near the solution).

    Differentiable (through the unrolled Newton steps). Not invariant to scaling ``G``: ``c G``
    gives ``c^(-alpha/(alpha+1)) w``. No solution exists when a positive combination of the rows is
    zero (a Pareto-stationary point, e.g. a zero Gramian): the weights then grow with
    ``max_iters``.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        alpha: Fairness parameter, ``>= 0``.
        max_iters: Number of Newton steps.

    Returns:
        Positive weights of shape ``S``.

    Example:
        >>> import torch
        >>> from torchgram.weightings import fairgrad
        >>> fairgrad(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        tensor([0.5000, 1.0000])
    """
    call = "fairgrad(G)"
    M, shape = _to_matrix(G, call)
    _check_positive_int(max_iters, call, "max_iters")
    if not alpha >= 0:
        raise ValueError(f"{call}: expected alpha >= 0, got {alpha!r}.")
    if alpha == 0:
        m = M.shape[0]
        return _unflatten_weights(torch.full((m,), 1.0 / m, dtype=M.dtype, device=M.device), shape)
    return _unflatten_weights(_solve_fair(M, alpha, max_iters), shape)


def nash_mtl(G: Tensor, *, max_norm: float = 1.0, max_iters: int = 50) -> Tensor:
    """Weights of Nash-MTL: the Nash bargaining solution ``G w = 1 / w``, with a norm cap.

    Navon et al. (2022), Algorithm 1: ``w`` is the positive solution of ``G w = 1 / w`` (FairGrad
    with ``alpha=1``), so that every row improves by ``(G w)_i = 1 / w_i`` and the update has norm
    ``sqrt(wᵀGw) = sqrt(m)``. It is solved exactly by Newton steps on ``G / ||G||_F`` (for
    conditioning; the solution is then rescaled by ``||G||_F^(-1/2)``), where TorchJD runs at most
    ``optim_niter`` convex-concave steps with cvxpy; both reach the same point. When
    ``max_norm > 0`` and ``sqrt(wᵀGw)`` exceeds it, ``w`` is scaled down to norm ``max_norm``.

    Stateless: TorchJD's state (warm start, ``update_weights_every``) only saves computation. To
    update the weights every k steps, call it every k steps. Differentiable (unrolled Newton).
    ``c G`` gives ``w / sqrt(c)`` (so the capped weights are invariant to scaling as soon as the
    cap is active, e.g. with the default ``max_norm=1`` and ``m >= 2``). Not defined for a zero
    Gramian or a Pareto-stationary one (the weights grow with ``max_iters``).

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        max_norm: Largest norm of the update ``Jᵀw``; ``0`` disables the cap.
        max_iters: Number of Newton steps.

    Returns:
        Positive weights of shape ``S``.

    Example:
        >>> import torch
        >>> from torchgram.weightings import nash_mtl
        >>> nash_mtl(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), max_norm=0.0)
        tensor([0.5000, 1.0000])
    """
    call = "nash_mtl(G)"
    M, shape = _to_matrix(G, call)
    _check_positive_int(max_iters, call, "max_iters")
    if not max_norm >= 0:
        raise ValueError(f"{call}: expected max_norm >= 0, got {max_norm!r}.")
    scale = torch.linalg.matrix_norm(M)
    w = _solve_fair(M / scale, 1.0, max_iters) / scale.sqrt()
    if max_norm > 0:
        norm = torch.sqrt((w @ M @ w).clamp(min=0.0))
        w = w * torch.where(norm > max_norm, max_norm / norm, 1.0)
    return _unflatten_weights(w, shape)
