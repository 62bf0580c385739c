"""Everything torchgram takes from torch's private API, or from how torch behaves inside, in one
place.

Each item is marked with the torch version it was written against (``torch 2.13``) and what it
is for; the other modules call these functions and never torch's private names, so that an
upgrade of torch that changes one of them touches this file only. Where a private name is
missing, each item falls back to what public torch can do (slower, or more conservative).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from types import FunctionType
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

Tensor = torch.Tensor

# --- functorch: wrapped tensors and transform levels (torch 2.13: torch._C._functorch) --------

try:
    from torch._C._functorch import get_unwrapped as _get_unwrapped
    from torch._C._functorch import is_batchedtensor as _is_batched
    from torch._C._functorch import is_functorch_wrapped_tensor as _is_wrapped
    from torch._C._functorch import maybe_current_level as _current_level
    from torch._C._functorch import peek_interpreter_stack as _peek_interpreter_stack
except ImportError:  # pragma: no cover - older torch
    _is_batched = _is_wrapped = _current_level = _peek_interpreter_stack = None  # type: ignore[assignment]


def is_wrapped(tensor: Tensor) -> bool:
    """Whether a ``torch.func`` transform wraps ``tensor`` (a batched or a gradient-tracking
    tensor; a dual tensor of ``jvp`` requires no grad, but is wrapped)."""
    return _is_wrapped is not None and bool(_is_wrapped(tensor))


def tracked(tensor: Tensor) -> bool:
    """Whether ``tensor`` requires grad (plain autograd, ``torch.func.grad`` or ``vjp``), also
    beneath the wrappers of an outer ``vmap``, which report False (an ensemble whose stacked
    parameters require grad)."""
    while not tensor.requires_grad:
        if _is_batched is None or not _is_batched(tensor):
            return False
        tensor = _get_unwrapped(tensor)
    return True


def beneath_transforms(tensor: Tensor) -> Tensor:
    """The tensor beneath the wrappers of the active ``torch.func`` transforms: beneath an outer
    ``vmap``'s, the values of all its members at once (in a layout of its own), so that a
    reduction to a Python number is possible."""
    if _is_wrapped is None:  # pragma: no cover - older torch
        return tensor
    while _is_wrapped(tensor):
        tensor = _get_unwrapped(tensor)
    return tensor


def readable(tensor: Tensor) -> bool:
    """Whether the values of ``tensor`` can be read on the host: no ``vmap`` wraps it at any
    level (a Python ``if`` on a batched value is an error), and ``torch.compile`` is not tracing
    (a graph break)."""
    if torch.compiler.is_compiling():
        return False
    while _is_wrapped is not None and _is_wrapped(tensor):
        if _is_batched(tensor):
            return False
        tensor = _get_unwrapped(tensor)
    return True


def level() -> int | None:
    """The innermost active ``torch.func`` transform's level (None: none is active)."""
    return None if _current_level is None else _current_level()


def inside_func_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, vjp, jvp, ...) is active (when it cannot
    tell: yes, the transform-safe way)."""
    if _peek_interpreter_stack is None:  # pragma: no cover - older torch
        transforms = active_transforms()
        return transforms is None or bool(transforms)
    return _peek_interpreter_stack() is not None


def active_transforms() -> list[str] | None:
    """The keys of the active ``torch.func`` transforms, innermost last (None: cannot tell)."""
    try:  # torch 2.13: torch._functorch.pyfunctorch
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # pragma: no cover - older torch
        return None
    return [str(interpreter.key()) for interpreter in retrieve_all_functorch_interpreters()]


# --- the autograd engine: a batched pull-back without autograd.grad's argument handling -------
# torch 2.13: what autograd.grad(is_grads_batched=True) runs on (legacy batching of the rows)

try:
    from torch.autograd.graph import _engine_run_backward

    LEGACY_BATCHING = all(
        hasattr(torch, name) for name in ("_add_batch_dim", "_remove_batch_dim")
    ) and hasattr(torch._C, "_vmapmode_increment_nesting")
except ImportError:  # pragma: no cover - older torch
    LEGACY_BATCHING = False


def engine_grad_batched(
    out: Tensor,
    taps: Sequence[Tensor | GradientEdge],
    rows: Tensor,
    retain_graph: bool,
    create_graph: bool,
) -> tuple[Tensor | None, ...]:
    """``autograd.grad(out, taps, rows, is_grads_batched=True, allow_unused=True)`` for a plain
    tensor ``out`` and rows of its shape and dtype, run on the engine directly (only where
    ``LEGACY_BATCHING``)."""
    count = rows.shape[0]
    vmap_level = torch._C._vmapmode_increment_nesting()
    try:
        batched_rows = torch._add_batch_dim(rows, 0, vmap_level)  # type: ignore[attr-defined]
        grads = _engine_run_backward(
            (out,), (batched_rows,), retain_graph, create_graph, taps, True, accumulate_grad=False
        )
        return tuple(
            None if g is None else torch._remove_batch_dim(g, vmap_level, count, 0)  # type: ignore[attr-defined]
            for g in grads
        )
    finally:
        torch._C._vmapmode_decrement_nesting()


# --- gradient edges without get_gradient_edge's checks (torch 2.13) ---------------------------

_CUSTOM_NODE = torch._C._FunctionBase


def edge(value: Tensor, node: Any) -> GradientEdge:
    """``get_gradient_edge(value)`` of an output with its own node ``node``, without its checks
    (a node of a custom ``autograd.Function`` needs that function's ownership token: there the
    checked form)."""
    if isinstance(node, _CUSTOM_NODE):
        return get_gradient_edge(value)
    return GradientEdge(node, value.output_nr)


# --- custom autograd.Functions: their forward on the stack (torch 2.13) -----------------------

_APPLY = torch.autograd.Function.apply.__func__.__code__  # type: ignore[attr-defined]


def in_custom_function() -> bool:
    """Whether the caller runs inside a custom ``autograd.Function``'s forward (its ``apply``
    is on the Python stack): plain autograd differentiates the Function, not the ops of its
    forward."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _APPLY:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


# --- torch function modes and composite functions ---------------------------------------------


def active_modes() -> list[Any]:
    """The torch function modes active now, outermost first (torch 2.13: torch.overrides)."""
    from torch.overrides import _get_current_function_mode_stack

    return list(_get_current_function_mode_stack())


# the checks by which a composite torch.nn.functional function hands its arguments to the active
# modes (torch 2.13: torch.overrides' names, read from the function's globals)
DISPATCH_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def _never(*args: Any, **kwargs: Any) -> bool:
    return False


def without_dispatch(func: Any) -> FunctionType:
    """A copy of the Python function ``func`` (see ``dispatches``) that skips its
    ``__torch_function__`` dispatch, so that its body runs (under a mode, the primitive ops it is
    made of are seen one by one)."""
    scope = dict(func.__globals__)
    for name in DISPATCH_CHECKS:
        scope[name] = _never
    body = FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
    body.__kwdefaults__ = func.__kwdefaults__
    return body


def dispatches(func: Any) -> bool:
    """Whether ``func`` is a Python function that hands its arguments to the active modes."""
    return isinstance(func, FunctionType) and any(
        check in func.__code__.co_names for check in DISPATCH_CHECKS
    )


# --- attention kernels ------------------------------------------------------------------------


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """scaled_dot_product_attention's math kernel (torch 2.13: the fused CPU kernels have no vmap
    batching rule, forward or backward); choosing it costs about 10 us."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


# --- what torch.func refuses, by the start of its message (torch 2.13) ------------------------

MUTATES_CAPTURED = "mutate a captured Tensor"
FUNCTION_WITHOUT_SETUP_CONTEXT = "In order to use an autograd.Function with functorch transforms"
REQUIRES_GRAD_INSIDE = "You are attempting to call Tensor.requires_grad_()"
NO_STORAGE = "Cannot access data pointer of Tensor that doesn't have storage"
