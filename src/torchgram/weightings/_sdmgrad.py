"""``sdmgrad``: SDMGrad, a stateful weighting of a cross-Gramian by momentum SGD on the simplex."""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

from ._shapes import _check_positive_int, _uniform, _weighting
from ._simplex import _project_onto_simplex, _start


class SDMGradState(NamedTuple):
    """State of ``sdmgrad`` between calls.

    Attributes:
        w: ``[m]`` the simplex weights ``w`` reached by the previous call's inner solve
            (flattened), where the next one starts. The weights returned are
            ``(w + lambda_ pref) / (1 + lambda_)``.
    """

    w: Tensor


def _check_options(lr: float, momentum: float, n_iter: int, lambda_: float, call: str) -> None:
    """Raises if an option of ``sdmgrad`` is out of its range."""
    if not (0.0 < lr < math.inf and 0.0 <= lambda_ < math.inf):
        raise ValueError(
            f"{call}: expected lr > 0 and lambda_ >= 0, both finite, got lr={lr!r}, "
            f"lambda_={lambda_!r}. lr is the step size of the inner solver (default 10.0)."
        )
    if not 0.0 <= momentum < 1.0:
        raise ValueError(
            f"{call}: expected momentum in [0, 1), got {momentum!r}. With momentum >= 1 the "
            "inner solver's velocity never decays."
        )
    _check_positive_int(n_iter, call, "n_iter")


@_weighting("sdmgrad(G)", per_row=("pref",), cross=True)
def sdmgrad(
    G: Tensor,
    *,
    state: SDMGradState | None = None,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref: Tensor | None = None,
) -> tuple[Tensor, SDMGradState]:
    """Weights of SDMGrad from a cross-Gramian ``G12 = J_1 J_2ᵀ``, and the updated state.

    Xiao, Ban and Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms" (NeurIPS 2023, arXiv:2305.18409). The simplex weights ``w`` minimise
    ``½ |Jᵀ(w + lambda_ pref)|²``, which pulls the update towards the preferred direction
    ``Jᵀ pref``, with gradients estimated by ``G12``. ``G12`` is first normalised to
    ``A = G12 / (s² + 1e-8)``, with ``s`` the mean of ``sqrt(max(G12_ii, 0))``, then ``n_iter``
    steps of projected SGD with momentum run from the previous call's ``w`` (``1/m`` on the first
    call): ``g = A (w + lambda_ pref)``, ``v ← momentum v + g`` (``v = g`` on the first step of
    each call), ``w ← Π(w - lr v)``, with ``Π`` the Euclidean projection onto the simplex. The
    weights are ``(w + lambda_ pref) / (1 + lambda_)``. As TorchJD 0.18's ``SDMGradWeighting``.

    The input is a cross-Gramian, not a Gramian: ``G12 = J_1 J_2ᵀ`` ``[m, m]``, with ``J_1`` and
    ``J_2`` the Jacobians of the ``m`` objectives on two independent mini-batches (the paper's
    ``ξ`` and ``ξ'``), e.g. ``torchgram.cross_gramian(fn, params, (x_1,), (x_2,))``; it is not
    symmetric in general. Independence makes the inner gradients unbiased, which the paper's
    guarantees rely on. A Gramian ``J Jᵀ`` of one batch runs all the same, but its expectation
    adds the covariance of the batch's gradients: the inner gradients are biased and the
    guarantees are lost.

    Stateful: ``w, state = sdmgrad(G12, state=state)``; ``state=None`` starts from ``w = 1/m``.
    For a float16 or bfloat16 ``G12`` the state is kept in float32. With the default ``lr=10``
    the inner solve usually ends at a corner of the simplex, so the weights are
    ``(e_k + lambda_ pref) / (1 + lambda_)``, and small changes of ``G12`` can change the corner
    (rounding ``G12`` to bfloat16 does, now and then); a smaller ``lr`` (e.g. 0.1) moves ``w``
    smoothly.
    Invariant to ``G12 -> c G12`` (``c > 0``) but for the ``1e-8`` added to ``s²``, which the
    default ``lr`` can carry far (``1e-2`` in the weights now and then; ``1e-9`` at ``lr=0.1``).
    Not differentiable: the weights and the state are computed without gradient (as TorchJD's,
    which refuses one), so a ``G12`` that carries a graph (the ``cross_gramian`` of parameters
    that require grad) is fine, and successive states never chain graphs.

    Degenerate inputs: a zero ``G12`` leaves ``w`` where it was, so the first call gives
    ``(1/m + lambda_ pref) / (1 + lambda_)`` (``1/m`` for the uniform ``pref``); ``m = 1``
    gives ``(1 + lambda_ pref) / (1 + lambda_)`` (``[1]``); an indefinite or non-symmetric
    ``G12`` is used as it is (negative diagonal entries count as zero in ``s``).

    Args:
        G: The cross-Gramian ``J_1 J_2ᵀ`` ``[m, m]`` of two independent batches, or a generalized
            one ``S + S[::-1]`` (two batches whose outputs have the shape ``S``).
        state: The state returned by the previous call, or ``None``.
        lr: Step size of the inner solver, ``> 0``.
        momentum: Momentum of the inner solver, in ``[0, 1)``.
        n_iter: Number of inner steps per call, ``>= 1``.
        lambda_: Strength of the pull towards ``pref``, ``>= 0``.
        pref: The preference ``w̃`` of shape ``S`` or ``[m]`` (default: uniform ``1/m``, the
            mean gradient). Used as given (not normalised).

    Returns:
        The weights, of shape ``S``, and the new ``SDMGradState``.

    Raises:
        TypeError: If ``state`` is neither an ``SDMGradState`` nor ``None``, ``n_iter`` is not
            an int, or ``pref`` is not a tensor.
        ValueError: If ``lr <= 0``, ``lambda_ < 0`` (or either is not finite), ``momentum`` is
            outside ``[0, 1)``, ``n_iter < 1``, or ``pref`` or the state has the wrong shape.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import sdmgrad
        >>> G12 = torch.tensor([[2.0, -1.0], [0.5, 1.0]])  # J_1 J_2ᵀ: not symmetric
        >>> w, state = sdmgrad(G12, lr=0.5)
        >>> w
        tensor([0.5714, 0.4286])
        >>> w, state = sdmgrad(G12, state=state, lr=0.5)
    """
    call = "sdmgrad(G)"
    _check_options(lr, momentum, n_iter, lambda_, call)
    G, w = G.detach(), _start(state, SDMGradState, G, call).detach()
    if G.shape[0] == 0:
        return w, SDMGradState(w)
    target = lambda_ * (_uniform(G) if pref is None else pref.detach())
    # s² estimates the squared norm of a gradient: lr does not depend on the scale of the loss.
    scale = G.diagonal().clamp(min=0.0).sqrt().mean()
    A = G / (scale.pow(2) + 1e-8)
    velocity: Tensor | None = None
    for _ in range(n_iter):
        step = A @ (w + target)
        velocity = step if velocity is None else momentum * velocity + step
        w = _project_onto_simplex(w - lr * velocity)
    return (w + target) / (1.0 + lambda_), SDMGradState(w)
