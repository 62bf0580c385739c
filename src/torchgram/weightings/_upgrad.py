"""``upgrad`` and ``dualproj``: weightings projecting onto the dual cone of the rows."""

from __future__ import annotations

import torch
from torch import Tensor

from ._dual_cone import _project_weights
from ._shapes import _check_positive_int, _uniform, _weighting


def _preference(
    G: Tensor, pref: Tensor | None, norm_eps: float, reg_eps: float, max_iters: int, call: str
) -> Tensor:
    """Checks the options; returns the preference ``[m]`` (``None``: the uniform ``1/m``)."""
    if norm_eps < 0.0 or reg_eps <= 0.0:
        raise ValueError(
            f"{call}: expected norm_eps >= 0 and reg_eps > 0, got norm_eps={norm_eps!r}, "
            f"reg_eps={reg_eps!r}. reg_eps makes the problem strictly convex; keep it small."
        )
    _check_positive_int(max_iters, call, "max_iters")
    return _uniform(G) if pref is None else pref


@_weighting("upgrad(G)", per_row=("pref",))
def upgrad(
    G: Tensor,
    *,
    pref: Tensor | None = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    max_iters: int = 500,
    tol: float | None = None,
) -> Tensor:
    """Weights of UPGrad: project each row onto the dual cone of the rows, then combine.

    Jacobian descent, arXiv:2406.16232. With ``G' = G / trace(G) + reg_eps * I`` (and
    ``G' = reg_eps * I`` when ``trace(G) < norm_eps``, as in TorchJD), the weights are
    ``w = sum_i v_i`` with ``v_i = argmin_v vᵀG'v subject to v >= pref_i * e_i``. The update ``Jᵀw``
    does not conflict with any row: ``G w >= -reg_eps * trace(G) * w`` (the regularisation is the
    only slack).

    All ``m`` quadratic programs share ``G`` and are solved together (see ``_dual_cone.py``): ADMM
    with an exact ``x``-update from one eigendecomposition, stopping when the relative optimality
    residual is below ``tol`` (``None``: 1e-11 in float64, 1e-5 in float32) or after ``max_iters``
    iterations (always ``max_iters`` under ``vmap``).

    Not differentiable: the result is computed without gradient.

    Degenerate Gramians: a zero ``G`` (trace below ``norm_eps``) gives ``w = pref``, and so does
    ``m = 1``; ``reg_eps`` makes a rank-deficient or slightly indefinite (rounding-level) ``G``
    positive definite, so the weights are unique and finite.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        pref: Preference vector of shape ``S`` or ``[m]`` (default: uniform ``1/m``).
        norm_eps: Below this trace, ``G`` is treated as zero.
        reg_eps: Added to the diagonal of the trace-normalised Gramian.
        max_iters: Maximal number of solver iterations.
        tol: Stopping tolerance on the relative optimality residual.

    Returns:
        Weights of shape ``S``.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import upgrad
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> upgrad(J @ J.T)
        tensor([1.1109, 0.7894])
    """
    u = _preference(G, pref, norm_eps, reg_eps, max_iters, "upgrad(G)")
    V = _project_weights(
        torch.diag(u), G, norm_eps=norm_eps, reg_eps=reg_eps, max_iters=max_iters, tol=tol
    )
    return V.sum(dim=0)


@_weighting("dualproj(G)", per_row=("pref",))
def dualproj(
    G: Tensor,
    *,
    pref: Tensor | None = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    max_iters: int = 500,
    tol: float | None = None,
) -> Tensor:
    """Weights of DualProj: project the preferred combination onto the dual cone of the rows.

    Equation 11 of Gradient Episodic Memory (Lopez-Paz and Ranzato, 2017), in the weight form of
    arXiv:2406.16232: ``w = argmin_v vᵀG'v subject to v >= pref`` with ``G'`` normalised and
    regularised as in ``upgrad``, and solved by the same solver. ``Jᵀw`` does not conflict with
    any row, up to the regularisation.

    Not differentiable: the result is computed without gradient.

    Degenerate Gramians: a zero ``G`` (trace below ``norm_eps``) gives ``w = pref``, and so does
    ``m = 1``; ``reg_eps`` makes a rank-deficient or slightly indefinite (rounding-level) ``G``
    positive definite, so the weights are unique and finite.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        pref: Preference vector of shape ``S`` or ``[m]`` (default: uniform ``1/m``).
        norm_eps: Below this trace, ``G`` is treated as zero.
        reg_eps: Added to the diagonal of the trace-normalised Gramian.
        max_iters: Maximal number of solver iterations.
        tol: Stopping tolerance on the relative optimality residual.

    Returns:
        Weights of shape ``S``.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import dualproj
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> dualproj(J @ J.T)
        tensor([0.6109, 0.5000])
    """
    u = _preference(G, pref, norm_eps, reg_eps, max_iters, "dualproj(G)")
    v = _project_weights(
        u.unsqueeze(0), G, norm_eps=norm_eps, reg_eps=reg_eps, max_iters=max_iters, tol=tol
    )
    return v.squeeze(0)
