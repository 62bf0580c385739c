"""The sample check: fn run sample by sample must agree with fn run on the samples as one batch.

``batch_dim`` promises that sample i of fn's output depends only on sample i of its inputs. The
first call on a signature compares the vmapped run's first two samples with fn run on them as one
batch (and the batched run's whole output and Gramian with the vmapped run's, see
:mod:`torchgram._run`), and refuses fn where they disagree beyond rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from torchgram._linearised import Options
from torchgram._probe import split_output
from torchgram._pytree import Inputs

Tensor = torch.Tensor


def check_samples(
    fn: Callable[..., Any], inputs: Inputs, data: list[Any], per_sample: Tensor, options: Options
) -> None:
    """Compare fn run sample by sample with fn run on the same samples as one batch."""
    batched, _ = split_output(inputs.call(fn, data), options.has_aux, options.caller)
    compare(batched, per_sample, options)


def compare(
    batched: Tensor, per_sample: Tensor, options: Options, where: str = "on the first two samples"
) -> None:
    """Raise if fn's output on samples as one batch differs from its outputs on each."""
    if batched.shape == per_sample.shape:
        if within_rounding(per_sample, batched, floor=1.0):
            return
        difference = (batched - per_sample).abs().max()
        what = f"outputs differ by up to {float(difference):.3g}"
    else:
        what = f"shapes differ: {list(batched.shape)} on the batch, {list(per_sample.shape)}"
    raise ValueError(
        f"{options.caller}: fn does not treat samples independently: {where}, "
        f"fn run sample by sample and fn run on them as one batch disagree ({what}). batch_dim "
        "promises that sample i of the output depends only on sample i of the inputs; an op "
        "that mixes samples (batch statistics, a mean or softmax over the batch, ...) breaks it. "
        "Remove the mixing, or use batch_dim=None (exact for any fn), or pass "
        "check_samples=False if the difference is expected (e.g. non-deterministic ops)."
    )


def within_rounding(a: Tensor, b: Tensor, floor: float) -> bool:
    """``|a - b| <= sqrt(eps) * max(max |b|, floor)`` everywhere (same shapes)."""
    if not b.numel():
        return True
    scale = b.abs().max().clamp(min=floor)
    return bool((a - b).abs().max() <= torch.finfo(b.dtype).eps ** 0.5 * scale)


def agree(a: Tensor, b: Tensor) -> bool:
    """Whether two Gramians of fn agree up to rounding."""
    return a.shape == b.shape and within_rounding(a, b, floor=torch.finfo(b.dtype).tiny)
