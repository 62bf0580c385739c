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

from torchgram._guards import captured_write_error
from torchgram._memo import Probed
from torchgram._pytree import Inputs
from torchgram._tape import Tape, TapeMismatch, differentiable

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
    return out, aux


@contextlib.contextmanager
def refuse_mutation(caller: str) -> Iterator[None]:
    """Turn torch.func's refusal to change a captured tensor in place into an error that says why.

    Both the probe and the real run of fn run inside ``torch.func`` transforms, which refuse the
    change before it happens.
    """
    try:
        yield
    except RuntimeError as error:
        if "mutate a captured Tensor" not in str(error):
            raise
        raise captured_write_error(caller, str(error)) from None


def probe(
    fn: Callable[..., Any], inputs: Inputs, per_sample: bool, has_aux: bool, caller: str
) -> Probed:
    """Run fn once under a shape-only tape (with ``per_sample``, on its first sample).

    It runs inside a ``torch.func`` transform, like the real run, so that an in-place change of a
    tensor fn did not create is refused here, before it happens, with an error that says why.
    """
    data = inputs.first(1) if per_sample else inputs.data  # what each vmapped call sees
    tape = Tape(inputs.params, None, caller, per_sample)
    shapes: list[torch.Size] = []

    def run(unused: Tensor) -> Tensor:
        with torch.no_grad(), tape:
            shapes.append(split_output(inputs.call(fn, data), has_aux, caller)[0].shape)
        return unused

    with refuse_mutation(caller):
        vjp(run, torch.zeros(()))
    records = [record.shape for record in tape.records]
    return Probed(
        tape.tap_shapes,
        shapes[0],
        record_shapes=records,
        output_tap_shapes=tape.output_shapes,
        attention=tape.guard.attention,
        custom_function=tape.guard.custom_function,
    )


def check_taps(tape: Tape, probed: Probed, caller: str) -> None:
    """No tap was left unused (each one was checked against its output as it was added)."""
    if len(tape.tap_shapes) != len(probed.tap_shapes):
        raise TapeMismatch(caller)
