"""The probe: one shape-only run of ``fn`` before the real run, and the checks both runs share.

The real run adds a zero tap to every tapped output, so it needs their shapes first; the probe
learns them (and fn's output shape) under a tape that only records. Both runs go through
``split_output`` (fn's result checked) and ``refuse_mutation`` (a clear error for in-place changes
of tensors fn did not create, which ``torch.func`` refuses before they happen).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import vjp

from torchgram._guards import restore
from torchgram._internals import (
    FUNCTION_WITHOUT_SETUP_CONTEXT,
    MUTATES_CAPTURED,
    NO_STORAGE,
    REQUIRES_GRAD_INSIDE,
)
from torchgram._memo import Probed
from torchgram._ops.norm import captured_write_error
from torchgram._pytree import Inputs
from torchgram._tape import Tape
from torchgram._uses import TapeMismatch, differentiable

Tensor = torch.Tensor


def split_output(result: Any, has_aux: bool, caller: str) -> tuple[Tensor, Any]:
    """fn's result as ``(output, aux)``, checked (aux None without has_aux)."""
    if has_aux:
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise TypeError(
                f"{caller}: has_aux=True but fn returned a {type(result).__name__}, not a pair. "
                "Return (output, aux), or set has_aux=False."
            )
        out, aux = result
    else:
        out, aux = result, None
    if not isinstance(out, Tensor):
        hint = (
            " If fn returns (output, aux), set has_aux=True." if isinstance(result, tuple) else ""
        )
        raise TypeError(
            f"{caller}: fn must return a tensor (the output whose Jacobian's Gramian is "
            f"computed), but it returned a {type(out).__name__}.{hint}"
        )
    if not differentiable(out):
        raise TypeError(
            f"{caller}: fn's output has dtype {out.dtype}; it must be floating-point to have "
            "gradients."
        )
    if out.is_complex():
        raise TypeError(
            f"{caller}: fn's output is complex ({out.dtype}). torchgram computes the Gramian of "
            "a real output's Jacobian; return its real and imaginary parts as real outputs "
            "(torch.view_as_real(out)), or the real quantity you optimise (e.g. out.abs())."
        )
    return out, aux


# What torch.func refuses in fn (by its message, see torchgram._internals), and the error that
# says why and what to do instead.
_REFUSALS = (
    (MUTATES_CAPTURED, lambda caller, detail: captured_write_error(caller, detail)),
    (
        FUNCTION_WITHOUT_SETUP_CONTEXT,
        lambda caller, detail: ValueError(
            f"{caller}: fn calls a custom autograd.Function without a setup_context "
            "staticmethod, which torch.func transforms (that torchgram runs fn under) cannot "
            "run. torch.utils.checkpoint(..., use_reentrant=True) is such a Function: pass "
            "use_reentrant=False. For a Function of your own, split its forward into forward "
            "and setup_context (see torch.autograd.Function's docs)."
        ),
    ),
    (
        REQUIRES_GRAD_INSIDE,
        lambda caller, detail: ValueError(
            f"{caller}: fn calls requires_grad_() or torch.autograd.grad (a gradient inside "
            "fn, e.g. a gradient penalty), which torch.func transforms (that torchgram runs fn "
            "under) refuse; a backward pass inside fn would also run outside the ops the tape "
            "records. Compute such a term outside fn, or use torch.func.jacrev on the whole "
            "loss for this Gramian."
        ),
    ),
    (
        NO_STORAGE,
        lambda caller, detail: ValueError(
            f"{caller}: fn reads a tensor's memory directly (x.numpy(), x.tolist(), or an "
            "extension op without torch.func support), which torch.func transforms (that "
            "torchgram runs fn under, to learn its shapes and with batch_dim) cannot run. Use "
            "torch ops (x.item() works outside vmap), or pass batch_dim=None, where fn runs "
            "once under plain autograd."
        ),
    ),
)


@contextlib.contextmanager
def refuse_mutation(caller: str) -> Iterator[None]:
    """Turn torch.func's refusals of what fn does (a write into a captured tensor, a custom
    Function it cannot run, a read of a tensor's memory) into errors that say why and what to
    do instead.

    The probe and the runs of fn under torch.func meet them; a write is refused before it
    happens.
    """
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        for start, explain in _REFUSALS:
            if start in text:
                raise explain(caller, text) from None
        raise


def probe(
    fn: Callable[..., Any], inputs: Inputs, per_sample: bool, has_aux: bool, caller: str
) -> tuple[Probed, Tensor]:
    """Run fn once under a shape-only tape (with ``per_sample``, on its first sample); return
    what it learned and fn's output (without a graph).

    It runs inside a ``torch.func`` transform, like the real run, so that an in-place change of a
    tensor fn did not create is refused here, before it happens, with an error that says why.
    """
    data = inputs.first(1) if per_sample else inputs.data  # what each vmapped call sees
    tape = Tape(inputs.params, None, caller, per_sample)

    def run(unused: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad(), tape:
            out = split_output(inputs.call(fn, data), has_aux, caller)[0]
        return unused, tape.output(out)

    try:
        with refuse_mutation(caller):
            _, _, out = vjp(run, torch.zeros(()), has_aux=True)  # type: ignore[misc]
    finally:
        restore(tape.guard.statistics)  # the probe only learns: the real run updates them
    records = [record.shape for record in tape.records]
    probed = Probed(
        tape.tap_shapes,
        out.shape,
        record_shapes=records,
        output_tap_shapes=tape.output_shapes,
        custom_function=tape.guard.custom_function,
        random=tape.random,
    )
    return probed, out


def check_taps(tape: Tape, probed: Probed, caller: str) -> None:
    """No tap was left unused (each one was checked against its output as it was added)."""
    if len(tape.tap_shapes) != len(probed.tap_shapes):
        raise TapeMismatch(caller)
