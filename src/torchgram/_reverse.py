"""The real run of ``fn`` with respect to its taps, and the one reverse pass back to them.

Two ways to differentiate with respect to the taps give the same cotangents:

- **plain autograd** (no ``torch.func`` transform is active): ``fn`` runs with grad enabled on
  copies of the parameters that require grad, each use's output is taken by its gradient edge
  (no op is added to fn; see ``linearise_made_taps``), and ``torch.autograd.grad`` with
  ``is_grads_batched`` pulls back every output row at once. (Under ``vmap`` over the samples
  the taps are leaves that require grad, added to the outputs.) It has none of
  ``torch.func.vjp``'s per-op cost (about a tenth of a small model's call). Plain autograd would
  let fn write into tensors it did not create (a buffer, an argument), which ``vjp`` refuses
  before they happen; the tape hands such a run back before the write
  (``torchgram._guards``), and it is made again under ``vjp``.
- **torch.func.vjp** inside a ``torch.func`` transform (an ensemble's ``vmap``, an outer ``grad``),
  so that the run composes with it, under ``torch.inference_mode`` (where autograd records
  nothing), and for runs handed back.

Either way the reverse pass frees the forward's saved tensors as it goes, as a backward pass does,
and records a graph of its own only when the Gramian may be differentiated: when fn's output
depends on a tensor that requires grad outside the run (parameters or data that require grad,
tensors fn closes over, an outer ``grad``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import optree
import torch
from torch.autograd.graph import GradientEdge
from torch.func import vjp, vmap

from torchgram._guards import NeedsTransform
from torchgram._internals import (
    LEGACY_BATCHING,
    active_transforms,
    engine_grad_batched,
    inside_func_transform,
    tracked,
)
from torchgram._uses import TapeMismatch, TapShape

Tensor = torch.Tensor
Tap = Tensor | GradientEdge

# made(params) -> (out, aux, taps, shapes): a run that makes its own taps (see linearise_made_taps)
MadeRun = Callable[[tuple[Tensor, ...]], tuple[Tensor, Any, list[Tap], list[TapShape]]]
# run(taps, watch) -> (out, aux); watch: the run is plain autograd (see torchgram._guards)
Run = Callable[[tuple[Tensor, ...], bool], tuple[Tensor, Any]]


class Pull(Protocol):
    """``pull(rows, batched, keep=False)``: see ``Reverse``."""

    def __call__(self, rows: Tensor, batched: bool, keep: bool = False) -> tuple[Tensor, ...]: ...


@dataclass
class Reverse:
    """fn's output, its aux, and how to pull cotangents back to the taps.

    Attributes:
        out: fn's output (detached unless ``differentiable``).
        aux: What the run returned beside the output (tensors detached unless differentiable).
        differentiable: Whether the output depends on tensors that require grad outside the run.
        pull: ``pull(rows, batched, keep=False)`` gives the cotangents of every tap for the
            cotangent rows ``[R, *out.shape]`` of the output (``batched``), each ``[R, ...]``,
            or for one row ``[*out.shape]`` (not ``batched``). It frees the forward's graph
            unless ``keep`` (then it may be called again).
        made: Whether the run made its own taps (see ``linearise_made_taps``); None when
            it did not try.
        functional: Whether the reverse pass is ``torch.func.vjp``'s (else plain autograd's).
    """

    out: Tensor
    aux: Any
    differentiable: bool
    pull: Pull
    made: bool | None = None
    functional: bool = False


def linearise_taps(
    run: Run,
    taps: tuple[Tensor, ...],
    made: MadeRun | None = None,
    params: tuple[Tensor, ...] = (),
    autograd: bool = True,
) -> Reverse:
    """Run ``run(taps) -> (out, aux)`` so that cotangents can be pulled back to ``taps``.

    ``made``: the same run making its own taps (see ``linearise_made_taps``, on ``params``),
    used where plain autograd is. ``autograd``: whether plain autograd may be (False: fn calls a
    custom ``autograd.Function``, whose forward's ops the tape sees under plain autograd, where
    ``torch.func``, and so the probe, sees one ``custom_function_call``)."""
    if not taps:
        out, aux = run(taps, False)
        return Reverse(out, aux, False, _no_taps)
    if autograd and not (inside_func_transform() or torch.is_inference_mode_enabled()):
        try:
            if made is None or not may_make_taps(params):
                return _by_autograd(run, taps)
            with contextlib.suppress(Unmade):
                return linearise_made_taps(made, params)
            return dataclasses.replace(_by_autograd(run, taps), made=False)  # leaf taps instead
        except NeedsTransform:  # fn may write into a tensor it did not create: let vjp tell
            pass
    return _by_vjp(run, taps)


def _no_taps(rows: Tensor, batched: bool, keep: bool = False) -> tuple[Tensor, ...]:
    return ()


class Unmade(Exception):
    """The run on copies of the parameters failed where the run with leaf taps may not (data
    made under inference mode, which autograd cannot save once the copies require grad)."""


def pull_back(
    reverse: Reverse, per_sample: torch.Size, apart: bool | None = False
) -> tuple[list[Tensor], bool]:
    """Cotangents ``[K, B, ...]`` of every tap, for the K one-hot rows of each sample (``K`` =
    ``per_sample.numel()``, the output of one sample having shape ``per_sample``), pulled back
    all at once (``apart`` False: one batched pass), one row at a time (True: K passes), or
    (None, three rows or more) the first row alone (a warm-up), the second alone and the others
    at once, those two timed. Returns the cotangents and whether one row at a time is the
    faster (for the next call).

    Neither is always faster: a batched pass runs every op's backward under legacy ``vmap``,
    whose batching of some backward formulas is slow (``mean``'s and ``pow``'s, 20x and 7x the
    loop over three rows of a ``[64, 512, 64]`` activation), where on a matmul-heavy graph it
    saves K - 1 passes of Python and kernel launches.
    """
    out = reverse.out
    rows = per_sample.numel()
    if rows == 1:
        return [c.unsqueeze(0) for c in reverse.pull(torch.ones_like(out), False)], bool(apart)
    eye = torch.eye(rows, dtype=out.dtype, device=out.device).reshape(rows, *per_sample)
    eye = eye.expand(rows, *out.shape)
    if apart:
        pulled = _row_by_row(lambda row: reverse.pull(row, False, keep=True), eye)
        return cast(list[Tensor], list(pulled)), True  # pull gives zeros for unused taps
    if apart is False or rows < 3:
        return list(reverse.pull(eye, True)), False
    first = reverse.pull(eye[0], False, keep=True)  # untimed: the first pass warms up
    start = time.perf_counter()
    second = reverse.pull(eye[1], False, keep=True)
    middle = time.perf_counter()
    others = reverse.pull(eye[2:], True)
    one, rest = middle - start, time.perf_counter() - middle
    parts = zip(first, second, others, strict=True)
    cotangents = [torch.cat([f.unsqueeze(0), s.unsqueeze(0), o]) for f, s, o in parts]
    return cotangents, one * (rows - 2) < rest


def _by_vjp(run: Run, taps: tuple[Tensor, ...]) -> Reverse:
    out, pullback, aux = vjp(lambda t: run(t, False), taps, has_aux=True)  # type: ignore[misc]
    differentiable = torch.is_grad_enabled() and tracked(out)

    def pull(rows: Tensor, batched: bool, keep: bool = False) -> tuple[Tensor, ...]:
        once = functools.partial(pullback, retain_graph=keep, create_graph=differentiable)
        (cotangents,) = vmap(once)(rows) if batched else once(rows)
        return tuple(cotangents)

    return Reverse(out, aux, differentiable, pull, functional=True)


def may_make_taps(params: tuple[Tensor, ...]) -> bool:
    """Whether ``linearise_made_taps`` can run on ``params``: an inference tensor (made under
    ``torch.inference_mode``) can have no copy that requires grad."""
    return not any(p.is_inference() for p in params)


def plain_autograd(params: tuple[Tensor, ...]) -> bool:
    """Whether a run can be plain autograd on copies of the parameters that require grad."""
    return (
        not inside_func_transform()
        and not torch.is_inference_mode_enabled()
        and may_make_taps(params)
    )


def linearise_made_taps(run: MadeRun, params: tuple[Tensor, ...]) -> Reverse:
    """Plain autograd with respect to taps that ``run(params) -> (out, aux, taps, shapes)`` makes
    as it goes: the gradient edges of use outputs (no op is added to fn), or leaves that require
    grad where an output has no edge of its own. ``shapes``: each tap's shape, dtype and device.

    So that every use's output is in the graph, fn runs on ``params`` made to require grad (copies
    of those that do not; the copies do not make the Gramian differentiable). Only outside
    ``torch.func`` transforms; a write into a tensor fn did not create raises
    ``NeedsTransform`` (the caller makes the run another way); a ``RuntimeError`` of
    torch's (not a ``torchgram._uses.TapeMismatch``) raises ``Unmade`` (the caller
    makes the run another way, which gives the result or the error)."""
    grad_enabled = torch.is_grad_enabled()
    own, copies = _requiring_grad(params)
    try:
        with torch.enable_grad():
            out, aux, taps, shapes = run(own)
    except TapeMismatch:
        raise
    except RuntimeError as error:  # torch's (torchgram's own errors and fn's others propagate)
        raise Unmade from error
    made = tuple(tap for tap in taps if isinstance(tap, Tensor))
    result = _autograd_reverse(out, aux, tuple(taps), shapes, grad_enabled, made + copies)
    result.made = True
    return result


def linearise_params(
    run: Callable[[tuple[Tensor, ...]], tuple[Tensor, Any]], params: tuple[Tensor, ...]
) -> Reverse:
    """Plain autograd with respect to the parameters themselves: ``run(params) -> (out, aux)``
    on ``params`` made to require grad (copies of those that do not), no tape. Its pull gives
    each leaf's gradients of the rows. Only outside ``torch.func`` transforms
    (``plain_autograd``). A ``RuntimeError`` of torch's raises ``Unmade`` (the caller makes
    the run another way, which gives the result or the error)."""
    grad_enabled = torch.is_grad_enabled()
    own, copies = _requiring_grad(params)
    try:
        with torch.enable_grad():
            out, aux = run(own)
    except TapeMismatch:
        raise
    except RuntimeError as error:
        raise Unmade from error
    shapes = [(p.shape, p.dtype, p.device) for p in own]
    return _autograd_reverse(out, aux, own, shapes, grad_enabled, copies)


def _requiring_grad(params: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``params`` with copies (that require grad) of those that do not, and those copies."""
    own = tuple(p.detach().requires_grad_() if not p.requires_grad else p for p in params)
    return own, tuple(c for c, p in zip(own, params, strict=True) if c is not p)


def _by_autograd(run: Run, taps: tuple[Tensor, ...]) -> Reverse:
    grad_enabled = torch.is_grad_enabled()
    leaves = tuple(tap.detach().requires_grad_() for tap in taps)
    with torch.enable_grad():
        out, aux = run(leaves, True)
    shapes = [(leaf.shape, leaf.dtype, leaf.device) for leaf in leaves]
    return _autograd_reverse(out, aux, leaves, shapes, grad_enabled, leaves)


def _autograd_reverse(
    out: Tensor,
    aux: Any,
    taps: tuple[Tap, ...],
    shapes: list[TapShape],
    grad_enabled: bool,
    own: tuple[Tensor, ...],
) -> Reverse:
    """The reverse pass of a plain autograd run of fn with respect to the taps (``own``: the
    leaves the run made to require grad; a graph reaching any other makes the result
    differentiable)."""
    differentiable = grad_enabled and _needs_grad_beyond([out], own)

    def zeros(lead: tuple[int, ...], shape: TapShape) -> Tensor:
        size, dtype, device = shape
        return torch.zeros((*lead, *size), dtype=dtype, device=device)

    def pull(rows: Tensor, batched: bool, keep: bool = False) -> tuple[Tensor, ...]:
        lead = (rows.shape[0],) if batched else ()
        if not out.requires_grad:  # fn's output depends on no tap
            return tuple(zeros(lead, shape) for shape in shapes)
        grad = functools.partial(
            _grad,
            out,
            taps,
            retain_graph=differentiable or keep,  # a new graph reaches into the forward's
            create_graph=differentiable,
        )
        grads: tuple[Tensor | None, ...]
        try:
            grads = grad(rows, batched=batched)
        except RuntimeError:
            # torch 2.13 cannot batch group_norm's backward that builds a graph (a size
            # mismatch); such a pull-back retained the forward's graph: row by row instead
            if not (batched and differentiable):
                raise
            grads = _row_by_row(grad, rows)
        return tuple(  # a tap the output does not depend on (a use only aux needs): zeros
            zeros(lead, shape) if g is None else g for g, shape in zip(grads, shapes, strict=True)
        )

    if differentiable:
        return Reverse(out, aux, True, pull)
    # Nothing outside the run needs a graph: what leaves it is detached from the taps' graph.
    aux = optree.tree_map(
        lambda x: x.detach() if isinstance(x, Tensor) else x, aux, none_is_leaf=True
    )
    return Reverse(out.detach(), aux, False, pull)


def _grad(
    out: Tensor,
    taps: tuple[Tap, ...],
    rows: Tensor,
    batched: bool = False,
    *,
    retain_graph: bool,
    create_graph: bool,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(out, taps, rows, is_grads_batched=batched, allow_unused=True)``.

    The batched form runs the engine once under the legacy batching of ``rows`` (as
    ``autograd.grad`` does), without ``autograd.grad``'s argument handling, which is generic
    and costs more than the engine on a small model: 286 against 105 us for a two-layer MLP's
    two rows, timed alone (a plain tensor output and rows of its shape and dtype need none of
    it). Elsewhere (and where torch lacks the internals) ``autograd.grad`` itself, which also
    says what is wrong with rows of another shape or dtype.
    """
    own = (
        batched
        and LEGACY_BATCHING
        and type(out) is Tensor  # no subclass that autograd.grad would hand its arguments to
        and type(rows) is Tensor
        and rows.shape[1:] == out.shape  # what autograd.grad's checks ask
        and rows.dtype == out.dtype
    )
    if not own:
        return torch.autograd.grad(
            out,
            taps,  # type: ignore[arg-type]  # tensors and edges together are fine
            rows,
            retain_graph=retain_graph,
            create_graph=create_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
    return engine_grad_batched(out, taps, rows, retain_graph, create_graph)


def _row_by_row(
    pull: Callable[[Tensor], tuple[Tensor | None, ...]], rows: Tensor
) -> tuple[Tensor | None, ...]:
    """``pull`` of each row of ``rows`` in turn (keeping the forward's graph), stacked (None
    stays None: a tap the output does not depend on). Each tap's rows are let go once
    stacked, so that stacking holds one tap's rows twice, not every tap's (the 3 rows of
    ConvNeXt-atto's 3.7M gradients: 44 MB)."""
    each = [list(pull(row)) for row in rows]
    if not each:  # no rows: nothing pulled
        return ()
    stacked: list[Tensor | None] = []
    for tap in range(len(each[0])):
        parts = [values[tap] for values in each]
        for values in each:
            values[tap] = None
        stacked.append(None if parts[0] is None else torch.stack(parts))  # type: ignore[arg-type]
        del parts
    return tuple(stacked)


def _needs_grad_beyond(roots: list[Tensor], leaves: tuple[Tensor, ...]) -> bool:
    """Whether the autograd graph of ``roots`` reaches a leaf that requires grad other than
    ``leaves`` (the run's own): a parameter, data or a tensor fn closes over (what makes the
    Gramian differentiable)."""
    tap_ids = {id(leaf) for leaf in leaves}
    if any(r.requires_grad and r.grad_fn is None and id(r) not in tap_ids for r in roots):
        return True  # such a leaf itself
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    seen = set(stack)
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ == "AccumulateGrad":  # a leaf
                if id(node.variable) not in tap_ids:  # type: ignore[attr-defined]
                    return True
            else:
                stack.append(node)
    return False


def transform_active(kind: str) -> bool:
    """Whether a ``torch.func`` transform of this kind is active (``"Vmap"``, ``"Jvp"``: a
    forward mode, which differentiates the Gramian without any tensor requiring grad)."""
    return any(kind in key for key in active_transforms() or [])
