"""``modo``: MoDo, a stateful weighting of a cross-Gramian by projected steps on the simplex."""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

from ._shapes import _weighting
from ._simplex import _project_onto_simplex, _start


class MoDoState(NamedTuple):
    """State of ``modo`` between calls.

    Attributes:
        weights: ``[m]`` the task weights ``λ`` of the previous call (the weights it returned,
            flattened), on the simplex.
    """

    weights: Tensor


@_weighting("modo(G)", cross=True)
def modo(
    G: Tensor, *, state: MoDoState | None = None, gamma: float = 0.1, rho: float = 0.1
) -> tuple[Tensor, MoDoState]:
    """Weights of MoDo from a cross-Gramian ``G12 = J_1 J_2ᵀ``, and the updated state.

    Chen, Fernando, Ying and Chen, "Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance" (JMLR 2024). One projected gradient step
    on the task weights ``λ`` for ``½ |Jᵀλ|² + ½ rho |λ|²``, with the gradient estimated by
    ``G12``: ``λ ← Π(λ - gamma (G12 λ + rho λ))``, with ``Π`` the Euclidean projection onto the
    simplex, from ``λ = 1/m`` on the first call; the weights are the new ``λ``. As TorchJD 0.18's
    ``MoDoWeighting``.

    The input is a cross-Gramian, not a Gramian: ``G12 = J_1 J_2ᵀ`` ``[m, m]``, with ``J_1`` and
    ``J_2`` the Jacobians of the ``m`` objectives on two independent mini-batches, e.g.
    ``torchgram.cross_gramian(fn, params, (x_1,), (x_2,))``; it is not symmetric in general.
    Independence makes ``G12 λ`` an unbiased estimate of the step on the full objectives, which
    MoDo's guarantees rely on. A Gramian ``J Jᵀ`` of one batch runs all the same, but its
    expectation adds the covariance of the batch's gradients: the steps are biased and the
    guarantees are lost.

    Stateful: ``w, state = modo(G12, state=state)``; ``state=None`` starts from ``λ = 1/m``. For
    a float16 or bfloat16 ``G12`` the state is kept in float32. Not scale-invariant: ``gamma`` is
    a step size in the units of ``G12``, so ``c G12`` takes a step ``c`` times longer.
    Not differentiable: the weights and the state are computed without gradient (as TorchJD's,
    which refuses one), so a ``G12`` that carries a graph (the ``cross_gramian`` of parameters
    that require grad) is fine, and successive states never chain graphs.

    Degenerate inputs: a zero ``G12`` only moves ``λ`` towards ``1/m``, to
    ``(1 - gamma rho) λ + gamma rho / m`` when ``gamma rho <= 1`` (``1/m`` on the first call);
    ``m = 1`` gives ``[1]``; an indefinite or non-symmetric ``G12`` is used as it is.

    Args:
        G: The cross-Gramian ``J_1 J_2ᵀ`` ``[m, m]`` of two independent batches, or a generalized
            one ``S + S[::-1]`` (two batches whose outputs have the shape ``S``).
        state: The state returned by the previous call, or ``None``.
        gamma: Step size of the ``λ`` update, ``> 0``.
        rho: Coefficient of the ``ℓ2`` regularisation of ``λ``, ``>= 0``.

    Returns:
        The weights ``λ``, of shape ``S`` and on the simplex, and the new ``MoDoState``.

    Raises:
        TypeError: If ``state`` is neither a ``MoDoState`` nor ``None``.
        ValueError: If ``gamma <= 0``, ``rho < 0`` (or either is not finite), or the state has
            the wrong shape.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import modo
        >>> G12 = torch.tensor([[2.0, -1.0], [0.5, 1.0]])  # J_1 J_2ᵀ: not symmetric
        >>> w, state = modo(G12)
        >>> w
        tensor([0.5125, 0.4875])
        >>> w, state = modo(G12, state=state)
        >>> w
        tensor([0.5227, 0.4773])
    """
    call = "modo(G)"
    if not (0.0 < gamma < math.inf and 0.0 <= rho < math.inf):
        raise ValueError(
            f"{call}: expected gamma > 0 and rho >= 0, both finite, got gamma={gamma!r}, "
            f"rho={rho!r}. gamma is the step size of the task weights (default 0.1)."
        )
    G, weights = G.detach(), _start(state, MoDoState, G, call).detach()
    if G.shape[0] == 0:
        return weights, MoDoState(weights)
    weights = _project_onto_simplex(weights - gamma * (G @ weights + rho * weights))
    return weights, MoDoState(weights)
