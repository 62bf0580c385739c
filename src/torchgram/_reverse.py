"""The real run of ``fn`` with respect to its taps, and the one reverse pass back to them.

Two ways to differentiate with respect to the taps give the same cotangents:

- **plain autograd** (no ``torch.func`` transform is active): the taps are leaves that require
  grad, ``fn`` runs with grad enabled, and ``torch.autograd.grad`` with ``is_grads_batched`` pulls
  back every output row at once. It has none of ``torch.func.vjp``'s per-op cost (about a tenth of
  a small model's call). Plain autograd would let fn write into tensors it did not create (a
  buffer, an argument), which ``vjp`` refuses before they happen; the tape hands such a run back
  before the write (:mod:`torchgram._guards`), and it is made again under ``vjp``.
- **torch.func.vjp** inside a ``torch.func`` transform (an ensemble's ``vmap``, an outer ``grad``),
  so that the run composes with it, under ``torch.inference_mode`` (where autograd records
  nothing), and for runs handed back.

Either way the reverse pass frees the forward's saved tensors as it goes, as a backward pass does,
and records a graph of its own only when the Gramian may be differentiated: when fn's output
depends on a tensor that requires grad outside the run (parameters or data that require grad,
tensors fn closes over, an outer ``grad``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optree
import torch
from torch.func import vjp, vmap

from torchgram._guards import NeedsTransform

Tensor = torch.Tensor
# run(taps, watch) -> (out, aux); watch: the run is plain autograd (see torchgram._guards)
Run = Callable[[tuple[Tensor, ...], bool], tuple[Tensor, Any]]


@dataclass
class Reverse:
    """fn's output, its aux, and how to pull cotangents back to the taps.

    Attributes:
        out: fn's output (detached unless ``differentiable``).
        aux: What the run returned beside the output (tensors detached unless differentiable).
        differentiable: Whether the output depends on tensors that require grad outside the run.
        pull: ``pull(rows, batched)`` gives the cotangents of every tap for the cotangent rows
            ``[R, *out.shape]`` of the output (``batched``), each ``[R, ...]``, or for one row
            ``[*out.shape]`` (not ``batched``). Call it once: it frees the forward's graph.
    """

    out: Tensor
    aux: Any
    differentiable: bool
    pull: Callable[[Tensor, bool], tuple[Tensor, ...]]


def linearise_taps(run: Run, taps: tuple[Tensor, ...]) -> Reverse:
    """Run ``run(taps) -> (out, aux)`` so that cotangents can be pulled back to ``taps``."""
    if not taps:
        out, aux = run(taps, False)
        return Reverse(out, aux, False, lambda rows, batched: ())
    if not (inside_func_transform() or torch.is_inference_mode_enabled()):
        try:
            return _by_autograd(run, taps)
        except NeedsTransform:  # fn may write into a tensor it did not create: let vjp tell
            pass
    return _by_vjp(run, taps)


def pull_back(reverse: Reverse, per_sample: torch.Size) -> list[Tensor]:
    """Cotangents ``[K, B, ...]`` of every tap, for the K one-hot rows of each sample (``K`` =
    ``per_sample.numel()``, the output of one sample having shape ``per_sample``)."""
    out = reverse.out
    rows = per_sample.numel()
    if rows == 1:
        return [c.unsqueeze(0) for c in reverse.pull(torch.ones_like(out), False)]
    eye = torch.eye(rows, dtype=out.dtype, device=out.device).reshape(rows, *per_sample)
    return list(reverse.pull(eye.expand(rows, *out.shape), True))


def _by_vjp(run: Run, taps: tuple[Tensor, ...]) -> Reverse:
    out, pullback, aux = vjp(lambda t: run(t, False), taps, has_aux=True)  # type: ignore[misc]
    differentiable = torch.is_grad_enabled() and out.requires_grad
    once = functools.partial(pullback, retain_graph=False, create_graph=differentiable)

    def pull(rows: Tensor, batched: bool) -> tuple[Tensor, ...]:
        (cotangents,) = vmap(once)(rows) if batched else once(rows)
        return tuple(cotangents)

    return Reverse(out, aux, differentiable, pull)


def linearise_made_taps(run: Callable[[], tuple[Tensor, Any, list[Tensor]]]) -> Reverse:
    """Plain autograd with respect to taps that ``run() -> (out, aux, taps)`` makes as it goes
    (leaves that require grad). Only outside ``torch.func`` transforms; a write into a tensor fn
    did not create raises :class:`NeedsTransform` (the caller makes the run another way)."""
    grad_enabled = torch.is_grad_enabled()
    with torch.enable_grad():
        out, aux, leaves = run()
    return _autograd_reverse(out, aux, tuple(leaves), grad_enabled)


def _by_autograd(run: Run, taps: tuple[Tensor, ...]) -> Reverse:
    grad_enabled = torch.is_grad_enabled()
    leaves = tuple(tap.detach().requires_grad_() for tap in taps)
    with torch.enable_grad():
        out, aux = run(leaves, True)
    return _autograd_reverse(out, aux, leaves, grad_enabled)


def _autograd_reverse(
    out: Tensor, aux: Any, leaves: tuple[Tensor, ...], grad_enabled: bool
) -> Reverse:
    """The reverse pass of a plain autograd run of fn with respect to the tap leaves."""
    differentiable = grad_enabled and _needs_grad_beyond([out], leaves)

    def pull(rows: Tensor, batched: bool) -> tuple[Tensor, ...]:
        lead = (rows.shape[0],) if batched else ()
        if not out.requires_grad:  # fn's output depends on no tap
            return tuple(leaf.new_zeros(*lead, *leaf.shape) for leaf in leaves)
        grads = torch.autograd.grad(
            out,
            leaves,
            rows,
            retain_graph=differentiable,  # the new graph reaches into the forward's
            create_graph=differentiable,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return tuple(  # a tap the output does not depend on (a use only aux needs): zeros
            leaf.new_zeros(*lead, *leaf.shape) if g is None else g
            for g, leaf in zip(grads, leaves, strict=True)
        )

    if differentiable:
        return Reverse(out, aux, True, pull)
    # Nothing outside the run needs a graph: what leaves it is detached from the taps' graph.
    aux = optree.tree_map(
        lambda x: x.detach() if isinstance(x, Tensor) else x, aux, none_is_leaf=True
    )
    return Reverse(out.detach(), aux, False, pull)


def _needs_grad_beyond(roots: list[Tensor], taps: tuple[Tensor, ...]) -> bool:
    """Whether the autograd graph of ``roots`` reaches a leaf that requires grad other than the
    taps: a parameter, data or a tensor fn closes over (what makes the Gramian differentiable)."""
    tap_ids = {id(tap) for tap in taps}
    if any(r.requires_grad and r.grad_fn is None and id(r) not in tap_ids for r in roots):
        return True  # such a leaf itself
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            if id(variable) not in tap_ids:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return False


def active_transforms() -> list[str] | None:
    """The keys of the active ``torch.func`` transforms, innermost last (None: cannot tell)."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # pragma: no cover - older torch
        return None
    return [str(interpreter.key()) for interpreter in retrieve_all_functorch_interpreters()]


def inside_func_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, vjp, jvp, ...) is active (when it cannot
    tell: yes, the transform-safe way)."""
    transforms = active_transforms()
    return transforms is None or bool(transforms)
