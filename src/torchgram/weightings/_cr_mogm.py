"""``cr_mogm``: a stateful wrapper smoothing the weights of another weighting with an EMA."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from ._shapes import _check_in_range, _compute_dtype, _output_shape, _weighting


class CRMOGMState(NamedTuple):
    """State of ``cr_mogm`` between calls.

    Attributes:
        weights: The smoothed weights of the previous call, of shape ``S``.
    """

    weights: Tensor


@_weighting("cr_mogm(G, weighting)", matrix=False)
def cr_mogm(
    G: Tensor,
    *,
    weighting: Callable[[Tensor], Tensor],
    state: CRMOGMState | None = None,
    alpha: float = 0.9,
    initial_weights: Tensor | None = None,
) -> tuple[Tensor, CRMOGMState]:
    """Weights of ``weighting(G)`` smoothed by an exponential moving average, and the new state.

    The weight smoothing of CR-MOGM (as in TorchJD's ``CRMOGMWeighting``):
    ``λ_t = alpha * λ_{t-1} + (1 - alpha) * weighting(G)``. On the first call (``state=None``),
    ``λ_0`` is ``initial_weights``, or the first weights themselves when it is ``None``.

    Stateful: ``w, state = cr_mogm(G, weighting=f, state=state)``. ``weighting`` must be a
    stateless weighting ``G -> w`` (configure it with ``functools.partial``). Differentiable when
    ``weighting`` is (the state is part of the graph; detach it between steps if needed).
    Degenerate Gramians behave as in ``weighting``; a ``G`` holding NaN or inf raises before
    ``weighting`` is called. For a float16 or bfloat16 ``G`` the average is taken, and the state
    kept, in float32.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``.
        weighting: The weighting to smooth, e.g.
            [`torchgram.weightings.mgda`][torchgram.weightings.mgda].
        state: The state returned by the previous call, or ``None``.
        alpha: Weight of the past in the average, in ``[0, 1]``.
        initial_weights: ``λ_0`` of shape ``S``, used only when ``state`` is ``None``.

    Returns:
        The smoothed weights, of shape ``S``, and the new ``CRMOGMState``.

    Raises:
        ValueError: If ``alpha`` is outside ``[0, 1]`` or a shape does not match ``S``.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import constant, cr_mogm
        >>> from functools import partial
        >>> f = partial(constant, weights=torch.tensor([1.0, 0.0]))
        >>> w, state = cr_mogm(torch.eye(2), weighting=f, initial_weights=torch.tensor([0.0, 1.0]))
        >>> w
        tensor([0.1000, 0.9000])
    """
    call = "cr_mogm(G, weighting)"
    _check_in_range(alpha, 0.0, 1.0, call, "alpha")
    if not callable(weighting):
        raise TypeError(
            f"{call}: expected weighting to be a callable G -> w, got {type(weighting).__name__}. "
            "Pass e.g. torchgram.weightings.mgda."
        )
    dtype = _compute_dtype(G.dtype)
    current = weighting(G).to(dtype)
    if state is not None:
        previous = state.weights.to(dtype)
        where = "state.weights"
    elif initial_weights is not None:
        previous = initial_weights.to(dtype=dtype, device=current.device)
        where = "initial_weights"
    else:
        previous, where = current, "weights"
    shape = _output_shape(G)
    if previous.shape != shape:
        raise ValueError(
            f"{call}: expected {where} of shape {list(shape)}, got {list(previous.shape)}. The "
            "number of rows changed: start again with state=None."
        )
    smoothed = alpha * previous + (1.0 - alpha) * current
    return smoothed, CRMOGMState(smoothed)
