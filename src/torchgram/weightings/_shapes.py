"""Validation of Gramians and the flattening of generalized Gramians shared by all weightings.

Every weighting is a body on an ``[m, m]`` matrix decorated with ``_weighting``, which checks
``G`` (``_check_gramian``), flattens it (``_to_matrix``: ``[m, m]``, float32 at least) and the
per-row options, and returns the body's weights by ``_as_weights`` (output shape, dtype of ``G``).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from torchgram._internals import readable
from torchgram._shapes import flatten


def _check_gramian(G: object, call: str, cross: bool = False) -> Tensor:
    """Raises if ``G`` is not a floating-point (generalized) Gramian, else returns it.

    ``cross``: ``G`` is a cross-Gramian ``J_1 J_2ᵀ``, whose wrong shape usually comes from two
    batches of different sizes; the error says so.
    """
    if not isinstance(G, Tensor):
        raise TypeError(
            f"{call}: expected G to be a torch.Tensor, got {type(G).__name__}. "
            "Pass the Gramian as a tensor, e.g. torch.as_tensor(G)."
        )
    if not G.is_floating_point():
        raise TypeError(
            f"{call}: expected a floating-point Gramian, got dtype {G.dtype}. "
            "Convert it first, e.g. G.to(torch.float32)."
        )
    k = G.ndim // 2
    if G.ndim % 2 != 0 or tuple(G.shape[k:]) != tuple(G.shape[:k])[::-1]:
        fix = (
            "Pass the cross-Gramian J_1 J_2ᵀ of two batches whose outputs have the same shape S "
            "(e.g. batches of the same size), not a Jacobian."
            if cross
            else "Pass the Gramian of the output, not the Jacobian."
        )
        raise ValueError(
            f"{call}: expected a Gramian of shape S + S[::-1] (e.g. [m, m] or [B, K, K, B]), "
            f"got shape {list(G.shape)}. {fix}"
        )
    if _can_read(G) and not bool(torch.isfinite(G).all()):
        raise ValueError(
            f"{call}: G holds NaN or inf values, so no weights can be computed from it. They "
            "come from non-finite losses, outputs or parameters, or from an overflow in float16: "
            "check those (e.g. with torch.autograd.set_detect_anomaly(True)) or compute G in "
            "float32."
        )
    return G


def _can_read(G: Tensor) -> bool:
    """Whether the values of ``G`` may be read on the host to raise an error: not under
    ``vmap`` nor ``torch.compile``; ``_as_weights`` then gives NaN weights for a non-finite G."""
    return readable(G)


def _output_shape(G: Tensor) -> torch.Size:
    """The shape ``S`` of the output whose generalized Gramian ``G`` (shape ``S + S[::-1]``) is."""
    return G.shape[: G.ndim // 2]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype weightings compute in: float32 for the half-precision ones (float16, bfloat16),
    which torch's linear algebra (eigh, lu, pinv) does not implement and which would lose the
    solvers' accuracy anyway."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _to_matrix(G: Tensor) -> Tensor:
    """The ``[m, m]`` flattening of a checked ``G``, in ``_compute_dtype``.

    Where ``G`` cannot be checked (``_can_read``), a non-finite one is replaced by zeros, so that
    no solver raises on it (``eigh`` does on NaN) and ``_as_weights`` makes its weights NaN.
    """
    M = flatten(G).to(_compute_dtype(G.dtype))
    if not _can_read(G):
        M = torch.where(torch.isfinite(M).all(), M, 0.0)
    return M


def _as_weights(w: Tensor, G: Tensor) -> Tensor:
    """The weights ``[m]`` computed from ``G`` in the output shape ``S`` and the dtype of ``G``.

    Where ``G`` could not be checked (``_can_read``), a non-finite ``G`` gives NaN weights.
    """
    if not _can_read(G):
        w = torch.where(torch.isfinite(G).all(), w, torch.nan)
    return w.reshape(_output_shape(G)).to(G.dtype)


_Body = TypeVar("_Body", bound=Callable[..., Any])


def _weighting(
    call: str, *, per_row: tuple[str, ...] = (), matrix: bool = True, cross: bool = False
) -> Callable[[_Body], _Body]:
    """Makes the weighting ``name(G, **options)`` of a body that works on an ``[m, m]`` matrix.

    The weighting has the body's signature and docstring. It checks ``G`` (its errors start with
    ``call``, e.g. ``"mgda(G)"``) and calls the body with ``G`` flattened to ``[m, m]`` in
    ``_compute_dtype``, and with each option named in ``per_row`` (shape ``S`` or ``[m]``)
    flattened to ``[m]`` in that dtype (``None`` passes where it is the default). The body returns
    the weights ``[m]``, or ``(weights, state)`` when stateful; the weighting returns them in the
    shape ``S`` and the dtype of ``G`` (NaN for a non-finite ``G`` that could not be checked).

    ``matrix=False`` is for a weighting that hands ``G`` on to another (``cr_mogm``): its body gets
    the checked ``G`` as given and returns weights of shape ``S``. ``cross=True`` is for a
    weighting of a cross-Gramian ``J_1 J_2ᵀ`` (``modo``, ``sdmgrad``): only the wording of the
    shape error changes.
    """

    def decorate(body: _Body) -> _Body:
        parameters = inspect.signature(body).parameters
        nullable = {name for name in per_row if parameters[name].default is None}

        @functools.wraps(body)
        def checked(G: object, **options: object) -> Any:
            G = _check_gramian(G, call, cross)
            M = _to_matrix(G) if matrix else G
            for name in per_row:
                if name in options and not (options[name] is None and name in nullable):
                    options[name] = _check_vector(options[name], _output_shape(G), M, call, name)
            out = body(M, **options)
            if isinstance(out, tuple):  # a stateful weighting: (weights, new state)
                return (_as_weights(out[0], G), *out[1:])
            return _as_weights(out, G)

        return cast(_Body, checked)

    return decorate


def _uniform(M: Tensor) -> Tensor:
    """Weights ``1/m`` ``[m]`` in the dtype and on the device of ``M`` [m, m] (empty for m = 0)."""
    m = M.shape[0]
    return torch.full((m,), 1.0 / max(m, 1), dtype=M.dtype, device=M.device)


def _check_vector(value: object, shape: torch.Size, like: Tensor, call: str, name: str) -> Tensor:
    """Validates a per-output option (e.g. a preference vector) and returns it flattened to [m].

    ``value`` may have the output shape ``S`` or the flattened shape ``[m]``. It is cast to the
    dtype and device of ``like``.
    """
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{call}: expected {name} to be a torch.Tensor or None, got {type(value).__name__}. "
            f"Pass {name}=torch.tensor([...])."
        )
    m = math.prod(shape)
    if value.shape != shape and value.shape != (m,):
        raise ValueError(
            f"{call}: expected {name} of shape {list(shape)} (the shape of the weights) or [{m}], "
            f"got shape {list(value.shape)}. Give one entry per row of the Jacobian."
        )
    return value.reshape(m).to(dtype=like.dtype, device=like.device)


def _check_in_range(value: float, low: float, high: float, call: str, name: str) -> None:
    """Raises a ValueError if ``value`` is not within ``[low, high]``."""
    if not low <= value <= high:
        raise ValueError(f"{call}: expected {name} in [{low}, {high}], got {value!r}.")


def _check_positive_int(value: int, call: str, name: str, minimum: int = 1) -> None:
    """Raises if ``value`` is not an int of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{call}: expected {name} to be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{call}: expected {name} >= {minimum}, got {value}.")
