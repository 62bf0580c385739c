"""The checks of a signature's first call: fn treats samples independently, and two runs of fn on
the same inputs give the same output.

``batch_dim`` promises that sample i of fn's output depends only on sample i of its inputs. The
first call on a signature compares fn run sample by sample (under ``vmap``, or in a loop) with fn
run on the whole batch at once, and refuses fn where they disagree beyond rounding. Both runs
start from the same state of the random generators, so that fn's random draws (dropout) are the
same in both and a mismatch means mixing. Where fn runs more than once in a call, its outputs
must agree too: fn that changes state it reads (a buffer assigned in forward) is refused rather
than given a Gramian of a state the call did not find.

The comparisons reduce to a Python bool, which an outer ``vmap`` cannot give of its own tensors:
they are made on the tensors beneath its wrappers (every ensemble member at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from torchgram._internals import beneath_transforms
from torchgram._linearised import Options
from torchgram._ops.random import DROPOUTS
from torchgram._probe import split_output
from torchgram._pytree import Inputs

Tensor = torch.Tensor

_MIXING = (
    "batch_dim promises that sample i of the output depends only on sample i of the inputs; "
    "an op that mixes samples (batch statistics, a mean or softmax over the batch, a branch "
    "on the batch size, ...) breaks it. Remove the mixing, or use batch_dim=None (exact for "
    "any fn), or pass check_samples=False if the difference is expected (e.g. non-deterministic "
    "ops, or random draws that differ between a batch and its samples)."
)


def check_samples(
    fn: Callable[..., Any], inputs: Inputs, per_sample: Tensor, options: Options
) -> None:
    """Compare fn run sample by sample (``per_sample``, its output) with fn run on the whole
    batch at once (without a graph)."""
    with torch.no_grad():
        batched, _ = split_output(inputs.call(fn, inputs.data), options.has_aux, options.caller)
    compare(batched, per_sample, options)


def compare(batched: Tensor, per_sample: Tensor, options: Options) -> None:
    """Raise if fn's output on the whole batch differs from its outputs on each sample."""
    what = _difference(batched.detach(), per_sample.detach())
    if what is not None:
        raise ValueError(
            f"{options.caller}: fn does not treat samples independently: on the whole batch, "
            f"fn run sample by sample and fn run on all samples at once disagree ({what}), "
            "though both started from the same state of the random generators. It may also "
            "change state that it reads (a buffer assigned in forward), which the runs see "
            f"in turn. {_MIXING}"
        )


def same_output(first: Tensor, again: Tensor, options: Options, why: str) -> None:
    """Raise if two runs of fn on the same inputs gave different outputs (``why``: why the call
    ran fn twice)."""
    what = _difference(again.detach(), first.detach())
    if what is not None:
        raise ValueError(
            f"{options.caller}: fn gave different outputs in two runs on the same inputs "
            f"({what}); this call ran fn twice because {why}. fn changes state that it reads "
            "(e.g. a buffer assigned in forward), so the Gramian of one run would not be that "
            "of the state the call found. Make fn a function of its arguments (pass such "
            "state in, and return its new value as aux), or call it outside torch.func "
            "transforms with batch_dim=None, where it runs once."
        )


def _difference(a: Tensor, b: Tensor) -> str | None:
    """What differs between two outputs beyond rounding (None: nothing): more than
    ``eps ** (2 / 3) * max(max |b|, 1)`` anywhere (2.4e-5 relative in float32, 3.7e-11 in
    float64), well above what another order of summation gives (a few eps) and below a leak
    of 1e-3 of another sample's value into outputs that spread over 4% of their size (per-sample
    losses at initialisation; ``sqrt(eps)`` let float32 leaks of 1e-2 through there). NaN where
    the other holds NaN too, and equal infinities, agree. Elementwise under any transform, then
    reduced beneath it (the layouts beneath an outer vmap may differ between tensors)."""
    if a.shape != b.shape:
        return f"shapes differ: {list(a.shape)} and {list(b.shape)}"
    if not b.numel() or a.is_meta or b.is_meta:  # nothing to compare (meta: no values)
        return None
    if bool(beneath_transforms(a.isnan() != b.isnan()).any()):
        return "one holds NaN where the other does not"
    alike = (a == b) | a.isnan()  # equal infinities, NaN in both
    gap = float(beneath_transforms(torch.where(alike, 0, (a - b).abs())).max())
    scale = float(beneath_transforms(torch.where(b.isfinite(), b.abs(), 0)).max())
    if gap <= _precision(b) ** (2 / 3) * max(scale, 1.0):
        return None
    return f"outputs differ by up to {gap:.3g}"


def _precision(x: Tensor) -> float:
    """The machine epsilon of ``x``'s dtype, or of autocast's where it is on (fn computed in
    it, whatever dtype its output has)."""
    eps = torch.finfo(x.dtype).eps
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        eps = max(eps, torch.finfo(torch.get_autocast_dtype(device)).eps)
    return eps


def within_rounding(a: Tensor, b: Tensor, floor: float) -> bool:
    """``|a - b| <= sqrt(eps) * max(max |b|, floor)`` everywhere (same shapes)."""
    if not b.numel():
        return True
    scale = b.abs().max().clamp(min=floor)
    return bool((a - b).abs().max() <= torch.finfo(b.dtype).eps ** 0.5 * scale)


def agree(a: Tensor, b: Tensor) -> bool:
    """Whether two Gramians of fn agree up to rounding."""
    a, b = beneath_transforms(a.detach()), beneath_transforms(b.detach())
    if a.is_meta or b.is_meta:  # no values to tell: not the same
        return False
    return a.shape == b.shape and within_rounding(a, b, floor=torch.finfo(b.dtype).tiny)


class _WithoutDropout(TorchFunctionMode):
    """Dropout ops return their input (what they give with ``training=False``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in DROPOUTS and args:
            return args[0]
        return func(*args, **(kwargs or {}))


def without_dropout(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Runs of fn without dropout (``enabled``), for checks between runs whose dropout masks
    cannot be the same: fn on each sample in turn draws them in another order than fn on the
    batch."""
    return _WithoutDropout() if enabled else contextlib.nullcontext()


class Draws:
    """The state of the random generators when made, so that runs can start from it again."""

    def __init__(self) -> None:
        self._cpu = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def replay(self) -> None:
        """Set the generators to the state they had when this was made."""
        torch.set_rng_state(self._cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
