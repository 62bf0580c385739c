"""The batched dual-cone projection solver shared by ``upgrad`` and ``dualproj``.

For each row ``u`` of ``U`` it solves the quadratic program ``argmin_v vᵀGv subject to v >= u``
(Proposition 1 of Jacobian Descent, arXiv:2406.16232): ``Jᵀv`` is the projection of ``Jᵀu`` onto
the dual cone ``{d : Jd >= 0}``. All problems share ``G``, so every iteration is one matrix
product ``[k, m] @ [m, m]``.

Method: ADMM (with the ``x``-update solved exactly through one eigendecomposition of ``G``) on the
Gramian normalised by its trace, regularised by ``reg_eps * I`` (so the problem is strongly convex
and has a unique solution even when ``G`` is rank deficient), and Jacobi-scaled to a unit diagonal
(so badly scaled rows do not slow it down). It runs at most ``max_iters`` iterations; outside of
``torch.func`` transforms and ``torch.compile`` it stops early, checking the optimality residual
(one host synchronisation per check) after 10 and 20 iterations, then where the rate between the
last two checks predicts it meets the tolerance (at most 20 iterations apart). Under ``vmap`` it
always runs ``max_iters`` iterations. For ``m <= 128`` that have not converged by then
(ill-conditioned problems), three primal-dual active-set steps with exact solves follow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchgram._internals import is_wrapped

from ._shapes import _compute_dtype


def _normalize_regularize(G: Tensor, norm_eps: float, reg_eps: float) -> Tensor:
    """Returns ``G / trace(G) + reg_eps * I``, or ``reg_eps * I`` when ``trace(G) < norm_eps``."""
    trace = G.diagonal().sum()
    small = trace < norm_eps
    normalized = torch.where(small, torch.zeros_like(G), G / torch.where(small, 1.0, trace))
    return normalized + reg_eps * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def _can_synchronize(x: Tensor) -> bool:
    """Whether reading a value of ``x`` on the host is allowed (not under vmap, grad or compile)."""
    return not (is_wrapped(x) or torch.compiler.is_compiling())


def _admm_operator(A: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``K = ρ(A + ρI)⁻¹`` and ρ, with ``ρ = sqrt(λmin λmax)`` (best fixed ρ of ADMM)."""
    eigenvalues, Q = torch.linalg.eigh(A)
    rho = torch.sqrt(eigenvalues[0].clamp(min=0.0) * eigenvalues[-1]).clamp(min=1e-12)
    K = (Q * (rho / (eigenvalues + rho))) @ Q.mT
    return K, rho


def _box_residual(x: Tensor, A: Tensor, lower: Tensor) -> Tensor:
    """Projected-gradient residual ``max|x - max(x - Ax, lower)|`` (A has a unit diagonal)."""
    return (x - torch.maximum(x - x @ A, lower)).abs().amax() / lower.abs().amax().clamp(min=1e-30)


def _solve_box_qp(A: Tensor, lower: Tensor, max_iters: int, tol: float) -> Tensor:
    """Solves ``argmin_x ½xᵀAx s.t. x >= lower`` for each row of ``lower`` [k, m].

    ``A`` [m, m] must be symmetric positive definite with a unit diagonal. ADMM on the splitting
    ``x = z``, ``z >= lower`` with over-relaxation 1.6: the ``x``-update is one product with the
    shared matrix ``K``. If ADMM has not met ``tol`` after ``max_iters`` iterations and
    ``m <= 128``, a few exact active-set steps finish the job. The returned ``z`` is always
    feasible.
    """
    K, _ = _admm_operator(A)
    relax = 1.6
    z = lower
    y = torch.zeros_like(lower)
    can_stop = _can_synchronize(A) and _can_synchronize(lower)
    check, checked = _CHECK_EVERY // 2, None
    for iteration in range(1, max_iters + 1):
        w = torch.addmm(torch.add(y, z, alpha=1.0 - relax), torch.sub(z, y), K, alpha=relax)
        z = torch.maximum(w, lower)
        y = w - z
        if can_stop and iteration == check:
            residual = float(_box_residual(z, A, lower))
            if residual <= tol:
                return z
            check += _until_next_check(checked, (iteration, residual), tol)
            checked = (iteration, residual)
    if A.shape[-1] <= _POLISH_MAX_M:
        z = _polish(A, lower, z, _POLISH_STEPS)
    return z


def _until_next_check(
    previous: tuple[int, float] | None, current: tuple[int, float], tol: float
) -> int:
    """Iterations until the next residual check (each check costs about one iteration and a
    host synchronisation): where the linear rate seen between the last two checks predicts the
    residual reaches ``tol * _CHECK_MARGIN``, between 1 and ``_CHECK_EVERY`` iterations away
    (``_CHECK_EVERY // 2`` after the first check, ``_CHECK_EVERY`` where the residual did not
    fall). The margin keeps the weights' accuracy where stopping at the first check below
    ``tol`` left it: the residual bounds the weights' error only up to the conditioning."""
    if previous is None:
        return _CHECK_EVERY // 2
    (i, before), (j, now) = previous, current
    target = tol * _CHECK_MARGIN
    if not (0.0 < now < before < math.inf and target > 0.0 and now / before > 0.0):
        return _CHECK_EVERY  # no progress, or tol <= 0 (then max_iters iterations run)
    rate = math.log(now / before) / (j - i)  # log of the residual's factor per iteration
    return min(_CHECK_EVERY, max(1, math.ceil(math.log(target / now) / rate)))


_CHECK_EVERY = 20
_CHECK_MARGIN = 0.1
_POLISH_MAX_M = 128
_POLISH_STEPS = 3


def _row_residuals(x: Tensor, A: Tensor, lower: Tensor) -> Tensor:
    """Per-row projected-gradient residual ``max_j |x - max(x - Ax, lower)|`` [k]."""
    return (x - torch.maximum(x - x @ A, lower)).abs().amax(dim=-1)


def _polish(A: Tensor, lower: Tensor, x: Tensor, steps: int) -> Tensor:
    """Primal-dual active-set steps (Hintermüller, Ito and Kunisch, 2002) from ``x``.

    Each step guesses the active set from ``x - Ax < lower`` and solves the equality-constrained
    problem on it exactly (one ``[m, m]`` solve per row: ``O(k m³)``, hence only for small ``m``).
    A row keeps its new value only where it lowers the optimality residual.
    """
    for _ in range(steps):
        free = (x - x @ A > lower).to(A.dtype)
        fixed = 1.0 - free
        system = A * free.unsqueeze(-1) * free.unsqueeze(-2) + torch.diag_embed(fixed)
        rhs = fixed * lower - free * ((fixed * lower) @ A)
        candidate = torch.maximum(torch.linalg.solve(system, rhs), lower)
        better = _row_residuals(candidate, A, lower) < _row_residuals(x, A, lower)
        x = torch.where(better.unsqueeze(-1), candidate, x)
    return x


def _project_weights(
    U: Tensor, G: Tensor, *, norm_eps: float, reg_eps: float, max_iters: int, tol: float | None
) -> Tensor:
    """For each row ``u`` of ``U`` [k, m], returns ``argmin_v vᵀG'v s.t. v >= u`` [k, m].

    ``G'`` is ``G`` [m, m] normalised by its trace and regularised (see the module docstring).
    Computed in float32 at least, without gradient. ``tol=None`` picks a tolerance from the dtype.
    """
    dtype = _compute_dtype(G.dtype)
    if G.shape[-1] == 0:  # no rows: nothing to solve (and eigh's extreme eigenvalues are undefined)
        return U.detach().to(G.dtype)
    with torch.no_grad():
        G_reg = _normalize_regularize(G.detach().to(dtype), norm_eps, reg_eps)
        scale = G_reg.diagonal().rsqrt()
        A = G_reg * scale.unsqueeze(-1) * scale.unsqueeze(-2)
        tol = _default_tol(dtype) if tol is None else tol
        U = U.detach().to(dtype)
        x = _solve_box_qp(A, U / scale, max_iters, tol)
        # Undoing the scaling can round below U by an ulp: clamp so that v >= u holds exactly.
        return torch.maximum(x * scale, U).to(G.dtype)


def _default_tol(dtype: torch.dtype) -> float:
    """Stopping tolerance on the relative optimality residual: 1e-11 (float64), 1e-5 (float32)."""
    return 1e-11 if dtype == torch.float64 else 1e-5


def _kkt_residual(V: Tensor, U: Tensor, G: Tensor, *, norm_eps: float, reg_eps: float) -> Tensor:
    """Largest violation of the optimality conditions of ``_project_weights``, relative to U.

    With ``G'`` as above and ``λ = G'v`` (the multipliers), the conditions are ``v >= u``,
    ``λ >= 0`` and ``λ ⊙ (v - u) = 0``; the residual is ``max|v - max(v - λ / diag(G'), u)|``
    divided by ``max|u|``: zero exactly at the solution.
    """
    G_reg = _normalize_regularize(G, norm_eps, reg_eps)
    lam = V @ G_reg
    projected = torch.maximum(V - lam / G_reg.diagonal(), U)
    return (V - projected).abs().amax() / U.abs().amax()
