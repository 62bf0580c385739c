"""``fairgrad`` and ``nash_mtl``: weights solving ``G w = w^(-1/alpha)`` (alpha-fair allocation)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _can_read, _check_positive_int, _uniform, _weighting

# A relative residual above this after the Newton steps means that no positive solution was found:
# G is (numerically) Pareto-stationary, and the residual stays at 1 or above. A solution has a
# residual at rounding level, which ill-conditioning can raise to about 1e-2 in float32.
_UNSOLVED = 0.1


def _relative_residual(G: Tensor, w: Tensor, power: float) -> Tensor:
    """``max_i |(G w)_i / w_i^power - 1|``: zero exactly at the solution of ``G w = w^power``."""
    return ((G @ w) / w**power - 1.0).abs().amax()


def _newton_step(G: Tensor, w: Tensor, power: float, largest: float) -> Tensor:
    """One damped Newton step on ``G w = w^power`` that keeps ``0 < w <= largest``.

    The step stays inside ``w > 0`` (fraction to the boundary 0.9); ``solve_ex`` and the finite
    mask keep a singular system (only for an indefinite ``G``) from raising or spreading NaN.
    """
    residual = G @ w - w**power
    jacobian = G + torch.diag_embed(-power * w ** (power - 1.0))
    step = -torch.linalg.solve_ex(jacobian, residual).result
    step = torch.where(torch.isfinite(step), step, 0.0)
    decreasing = step < 0  # a where in the denominator too: a finite derivative elsewhere
    ratios = torch.where(decreasing, w / torch.where(decreasing, -step, 1.0), torch.inf)
    return (w + (0.9 * ratios.amin()).clamp(max=1.0) * step).clamp(max=largest)


def _solve_fair(G: Tensor, alpha: float, max_iters: int) -> Tensor:
    """The positive solution of ``G w = w^(-1/alpha)``, or zeros where none is found.

    Damped Newton steps on ``G / ||G||_F`` (the solution is then scaled by
    ``||G||_F^(-alpha/(alpha+1))``). The equation is the stationarity condition of the strictly
    convex ``½wᵀGw - sum_i h(w_i)`` with ``h' = w^(-1/alpha)``; the start solves its diagonal part
    exactly. Weights are capped at ``eps^(-alpha/(alpha+1))``: beyond it, ``(G w)_i`` falls below
    the rounding of ``G w`` (``eps * w_i``), so the equation cannot be told from a
    Pareto-stationary one; the cap also keeps the Newton system invertible. Outside of ``vmap``
    and ``torch.compile`` it stops one step after the relative residual falls below ``sqrt(eps)``
    (quadratic convergence makes that step the last useful one). Zeros where the residual is
    still above ``_UNSOLVED`` after the steps.
    """
    if G.shape[0] == 0:
        return G.new_zeros(0)
    norm = torch.linalg.matrix_norm(G)
    norm = torch.where(norm > 0, norm, 1.0)
    G = G / norm
    eps = torch.finfo(G.dtype).eps
    power = -1.0 / alpha
    largest = eps ** (alpha / (-alpha - 1.0))
    w = torch.diagonal(G).clamp(min=eps) ** (alpha / (-alpha - 1.0))
    can_stop = _can_read(G)
    for _ in range(max_iters):
        converged = can_stop and bool(_relative_residual(G, w, power) <= eps**0.5)
        w = _newton_step(G, w, power, largest)
        if converged:
            break
    solved = _relative_residual(G, w, power) <= _UNSOLVED
    return torch.where(solved, w, 0.0) * norm ** (-alpha / (alpha + 1.0))


@_weighting("fairgrad(G)")
def fairgrad(G: Tensor, *, alpha: float = 1.0, max_iters: int = 50) -> Tensor:
    """Weights of FairGrad: the positive solution of ``G w = w^(-1/alpha)``.

    Ban and Ji (2024), Equation 4: the update maximises the alpha-fair utility of the per-row
    improvements. ``alpha=1`` is proportional fairness (the Nash bargaining solution of
    ``nash_mtl``), ``alpha -> inf`` approaches max-min fairness; ``alpha=0`` gives uniform
    weights ``1/m`` (as in TorchJD). Solved by at most ``max_iters`` damped Newton steps on
    ``G / ||G||_F`` (an ``[m, m]`` solve each; quadratic convergence near the solution; all
    ``max_iters`` under ``vmap``).

    Differentiable (through the unrolled Newton steps). Not invariant to scaling ``G``: ``c G``
    gives ``c^(-alpha/(alpha+1)) w``.

    Degenerate Gramians: no solution exists when a positive combination of the rows is zero (a
    Pareto-stationary ``G``: zero, or ``u uᵀ`` with ``u`` of both signs): no update improves every
    row. The weights are then zero (no update, the disagreement point of the bargaining); this is
    decided by the relative residual ``max_i |(G w)_i w_i^(1/alpha) - 1|`` being above 0.1 after
    the Newton steps. A rank-1 ``G = u uᵀ`` with ``u > 0`` gives ``w_i = (s u_i)^(-alpha)`` with
    ``s = (sum_i u_i^(1-alpha))^(1/(1+alpha))`` (``1 / (sqrt(m) u)`` for ``alpha=1``); ``m = 1``
    gives ``G^(-alpha/(alpha+1))``. A slightly indefinite ``G`` gives the solution of its own
    equation, close to that of the positive semi-definite ``G`` it rounds.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        alpha: Fairness parameter, ``>= 0``.
        max_iters: Number of Newton steps.

    Returns:
        Positive weights of shape ``S`` (zero where no solution exists, see above).

    Examples:
        >>> import torch
        >>> from torchgram.weightings import fairgrad
        >>> fairgrad(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        tensor([0.5000, 1.0000])
    """
    call = "fairgrad(G)"
    _check_positive_int(max_iters, call, "max_iters")
    if not alpha >= 0:
        raise ValueError(f"{call}: expected alpha >= 0, got {alpha!r}.")
    if alpha == 0:
        return _uniform(G)
    return _solve_fair(G, alpha, max_iters)


@_weighting("nash_mtl(G)")
def nash_mtl(G: Tensor, *, max_norm: float = 1.0, max_iters: int = 50) -> Tensor:
    """Weights of Nash-MTL: the Nash bargaining solution ``G w = 1 / w``, with a norm cap.

    Navon et al. (2022), Algorithm 1: ``w`` is the positive solution of ``G w = 1 / w`` (FairGrad
    with ``alpha=1``), so that every row improves by ``(G w)_i = 1 / w_i`` and the update has norm
    ``sqrt(wᵀGw) = sqrt(m)``. It is solved exactly by the Newton steps of ``fairgrad``, where
    TorchJD runs at most ``optim_niter`` convex-concave steps with cvxpy; both reach the same
    point. When ``max_norm > 0`` and ``sqrt(wᵀGw)`` exceeds it, ``w`` is scaled down to norm
    ``max_norm``.

    Stateless: TorchJD's state (warm start, ``update_weights_every``) only saves computation. To
    update the weights every k steps, call it every k steps. Differentiable (unrolled Newton).
    ``c G`` gives ``w / sqrt(c)``, capped or not: the update ``Jᵀw`` does not change.

    Degenerate Gramians: as ``fairgrad``, zero weights where no solution exists (a zero or
    Pareto-stationary ``G``). A rank-1 ``G = u uᵀ`` with ``u > 0`` gives ``1 / (sqrt(m) u)``
    (update norm ``sqrt(m)``), capped to ``max_norm / (m u)``; ``m = 1`` gives ``G^(-1/2)``
    (update norm 1).

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        max_norm: Largest norm of the update ``Jᵀw``; ``0`` disables the cap.
        max_iters: Number of Newton steps.

    Returns:
        Positive weights of shape ``S`` (zero where no solution exists, see above).

    Examples:
        >>> import torch
        >>> from torchgram.weightings import nash_mtl
        >>> nash_mtl(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), max_norm=0.0)
        tensor([0.5000, 1.0000])
    """
    call = "nash_mtl(G)"
    _check_positive_int(max_iters, call, "max_iters")
    if not max_norm >= 0:
        raise ValueError(f"{call}: expected max_norm >= 0, got {max_norm!r}.")
    w = _solve_fair(G, 1.0, max_iters)
    if max_norm > 0:
        squared_norm = (w @ G @ w).clamp(min=0.0)
        capped = squared_norm > max_norm**2  # also keeps sqrt's derivative at 0 out of the graph
        w = w * torch.where(capped, max_norm / torch.where(capped, squared_norm, 1.0).sqrt(), 1.0)
    return w
