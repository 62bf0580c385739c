"""Which run of ``fn`` gives the Gramian, and the checks of a signature's first call.

The runs (one reverse pass each, pulling back one one-hot cotangent per row to every tap):

- **whole** (``torchgram._whole``): without ``batch_dim``; the rows are fn's output elements;
- **batched**, **vmapped**, **looped** (``torchgram._per_sample``): with ``batch_dim``; the
  rows are each sample's output elements. The batched run (fn on the whole batch, no ``vmap``)
  is the fast one; it is used on a signature once its first call has checked it against the
  vmapped run, or against the looped run (one run per sample) where vmap cannot run fn.

How often fn runs, per call:

- without ``batch_dim``: once, outside ``torch.func`` transforms. Inside one (or where fn calls a
  custom ``autograd.Function``, or its parameters were made under inference mode), the first
  call on a signature runs a shape-only probe first, and the two outputs must agree. Where the
  first call finds that the rules would build each row's gradient anyway, later calls run fn
  without the tape and pull the rows back to the parameters (``torchgram._whole``).
- with ``batch_dim``: the first call on a signature runs the probe (on one sample), then the
  batched run and the run it is checked against, or, where the batched run does not apply, the
  vmapped (or looped) run and fn on the whole batch (the sample check). Every output must agree
  with the others. Later calls on the signature run fn once (or once per sample, looped).

A transform remembers what its first call learned per signature of the arguments (see
``torchgram._memo``); the eager forms remember it per fn.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from torchgram._guards import NeedsTransform, restore
from torchgram._linearised import Linearised, Options
from torchgram._memo import Probed, Probes, signature
from torchgram._per_sample import (
    batch_size,
    check_output,
    linearise_batched,
    linearise_looped,
    linearise_vmapped,
)
from torchgram._probe import probe
from torchgram._pytree import Inputs
from torchgram._reverse import Unmade, plain_autograd
from torchgram._samples import (
    Draws,
    agree,
    check_samples,
    compare,
    same_output,
    within_rounding,
    without_dropout,
)
from torchgram._uses import TapeMismatch
from torchgram._whole import (
    gradients_pay,
    linearise_to_params,
    linearise_whole,
    may_pull_to_params,
)

Tensor = torch.Tensor


def linearise(
    fn: Callable[..., Any], inputs: Inputs, options: Options, probes: Probes | None = None
) -> Linearised:
    """Run ``fn`` on ``inputs`` under the tape; see the module docstring.

    ``probes``: the calling transform's memory of earlier calls (None: learn everything anew,
    and do not try the batched run, whose check would not pay).
    """
    key = None
    if probes is not None:
        key = signature(inputs, options.batch_dim, options.has_aux, options.check_samples)
    remembered = None if probes is None else probes.take(key)
    if remembered is not None:
        with contextlib.suppress(TapeMismatch):  # fn uses its parameters differently now
            result = _again(fn, inputs, options, remembered)
            probes.keep(key, remembered)  # type: ignore[union-attr]
            return result
    if options.batch_dim is None:
        result, probed = _first_whole(fn, inputs, options, probes is not None)
    else:
        result, probed = _first_per_sample(fn, inputs, options, probes is not None)
    if probes is not None:
        probes.keep(key, probed)
    return result


def _again(fn: Callable[..., Any], inputs: Inputs, options: Options, probed: Probed) -> Linearised:
    """A call on a signature whose first call chose the run."""
    if options.batch_dim is None:
        if may_pull_to_params(probed, inputs):
            try:
                return linearise_to_params(fn, inputs, options)
            except (NeedsTransform, Unmade):  # a write into a tensor fn did not create, or
                probed.to_params = False  # torch's error: the taps' way refuses or gives it
        return linearise_whole(fn, inputs, options, probed)[0]
    batch = batch_size(inputs, options)
    if probed.batched and _may_batch(options, inputs, probed, batch):
        batched = linearise_batched(fn, inputs, options, probed, batch, probed.random)
        if batched is not None:
            return batched
    return _per_sample(fn, inputs, options, probed, batch)


def _first_whole(
    fn: Callable[..., Any], inputs: Inputs, options: Options, remember: bool
) -> tuple[Linearised, Probed]:
    """The first call without ``batch_dim``: one run where plain autograd can make the taps as
    it goes, else a probe and the run (whose outputs must agree). ``remember``: also choose
    where later calls pull the rows back to (see ``torchgram._whole.gradients_pay``)."""
    if plain_autograd(inputs.params):
        try:
            result, probed = linearise_whole(fn, inputs, options, None)
            probed.to_params = remember and gradients_pay(result)
            return result, probed
        except NeedsTransform:  # made again under torch.func, which refuses a write if need be
            functional = True
        except Unmade:  # e.g. data made under inference mode: leaf taps instead
            functional = False
    else:
        functional = False
    probed, first = probe(fn, inputs, False, options.has_aux, options.caller)
    probed.made_taps = False
    probed.custom_function |= functional
    result, probed = linearise_whole(fn, inputs, options, probed)
    if options.check_samples and not probed.random:
        try:
            same_output(first, result.out, options, "a probe learned the shapes of the taps first")
        except ValueError:
            restore(result.statistics)
            raise
    return result, probed


def _first_per_sample(
    fn: Callable[..., Any], inputs: Inputs, options: Options, remember: bool
) -> tuple[Linearised, Probed]:
    """The first call with ``batch_dim``: see the module docstring. Every run starts from the
    random generators' state that the call found; they end as one run leaves them."""
    batch = batch_size(inputs, options)
    start = Draws()
    probed, first = probe(fn, inputs, True, options.has_aux, options.caller)
    b = check_output(probed.shape, options)
    if not remember:
        probed.batched = False
    start.replay()
    result = _per_sample(fn, inputs, options, probed, batch)
    end = Draws()
    # looped, fn draws its dropout masks in another order than on the batch: the runs that are
    # compared run without dropout, and the one returned with it
    quiet = probed.looped and result.random
    with without_dropout(quiet):
        reference = _per_sample(fn, inputs, options, probed, batch) if quiet else result
        batched = None
        if _may_batch(options, inputs, probed, batch):
            start.replay()
            batched = linearise_batched(fn, inputs, options, probed, batch, True, reference)
            probed.batched = batched is not None
        if batched is not None:
            chosen = _verified(batched, reference, probed, options)
        elif options.check_samples and batch >= 2:
            start.replay()
            check_samples(fn, inputs, reference.out, options)
            probed.samples_checked = True
    if batched is not None and not quiet:
        result = chosen
    elif batched is not None and probed.batched:  # again, with dropout
        start.replay()
        result = linearise_batched(fn, inputs, options, probed, batch, True) or result
        end = Draws()
    end.replay()
    if options.check_samples and not (probed.random or result.random):
        same_output(first, result.out.narrow(b, 0, 1), options, "a probe ran it on one sample")
    if probed.looped and not probed.batched:
        _warn_looped(options, probed, batch)
    return result, probed


def _per_sample(
    fn: Callable[..., Any], inputs: Inputs, options: Options, probed: Probed, batch: int
) -> Linearised:
    """The vmapped run, or the looped one where vmap cannot run fn (learned on the first try:
    vmap raises, fn run on each sample in turn does not)."""
    if not probed.looped:
        try:
            return linearise_vmapped(fn, inputs, options, probed, batch)
        except RuntimeError as error:
            if isinstance(error, TapeMismatch):
                raise
            probed.looped = True
            probed.vmap_error = str(error).strip().split("\n")[0]
    try:
        return linearise_looped(fn, inputs, options, probed, batch)
    except TapeMismatch:
        raise ValueError(
            f"{options.caller}: fn cannot run under torch.func.vmap ({probed.vmap_error}), and "
            "run on each sample in turn it applies different ops to the parameters for "
            "different samples (a branch on a sample's values), so the samples' gradients "
            "cannot be stacked. Use batch_dim=None (exact for any fn), or write the branch "
            "with torch.where."
        ) from None


def _warn_looped(options: Options, probed: Probed, batch: int) -> None:
    warnings.warn(
        f"{options.caller}: fn cannot run under torch.func.vmap ({probed.vmap_error}), so it "
        f"runs on each sample in turn: {batch} runs of fn per call instead of one. The Gramian "
        "is exact, only slower. The usual cause is a branch on a tensor's value or .item() in "
        "fn; torch.where instead of the branch lets vmap run it.",
        stacklevel=5,
    )


def _verified(
    batched: Linearised, reference: Linearised, probed: Probed, options: Options
) -> Linearised:
    """The first batched run on a signature, against the vmapped (or looped) one: their outputs
    must agree (the sample check, on the whole batch), and so must their Gramians, or the
    batched run is not used again on this signature (its rows are not the samples it takes them
    for: fn reorders the samples, or builds a parameter view whose shape depends on the batch
    size). Returns the one to use now."""
    with torch.no_grad():
        compare(batched.out, reference.out, options)
        probed.samples_checked = True
        try:
            probed.batched = _same_rows(batched, reference)
        except Exception:  # the rules cannot replay a use of the batched run sample by sample
            probed.batched = False
    probed.random = batched.random
    chosen = batched if probed.batched else reference
    chosen.forget_factors()  # made without grad: made again for a Gramian that may need a graph
    return chosen


def _same_rows(batched: Linearised, reference: Linearised) -> bool:
    """Whether the batched run's rows are the samples: the same Gramian as the reference run's,
    and the same weighted gradients of every leaf for weights that tell the samples apart (a
    leaf whose share of the Gramian is small could hide wrong rows in the total), up to
    rounding of the largest gradient of any leaf."""
    if not agree(batched.gramian(), reference.gramian()):
        return False
    generator = torch.Generator().manual_seed(0)  # not the global generators: fn's draws
    weights = torch.randn(reference.out.shape, generator=generator, dtype=torch.float64)
    weights = weights.to(reference.out.dtype)
    expected = reference.vjp(weights)
    scale = max(float(g.abs().max()) if g.numel() else 0.0 for g in expected)
    floor = max(scale, torch.finfo(reference.out.dtype).tiny)
    pairs = zip(batched.vjp(weights), expected, strict=True)
    return all(within_rounding(mine, theirs, floor) for mine, theirs in pairs)


def _may_batch(options: Options, inputs: Inputs, probed: Probed, batch: int) -> bool:
    """Whether to try the batched run (see ``torchgram._batched``): plain autograd must be
    possible (outside transforms and inference mode, with parameters that can have copies that
    require grad: no inference tensors), it must pay where uses are tapped on their parameters
    (see ``_batched_pays``), and aux must not be stacked from per-sample calls. The sample
    check must run or have passed: without it the batched and the per-sample function may
    differ."""
    return (
        probed.batched is not False
        and batch >= 2
        and _batched_pays(probed)
        and not options.has_aux
        and not probed.custom_function  # plain autograd would not see it as the probe did
        and (options.check_samples or probed.samples_checked)
        and plain_autograd(inputs.params)
    )


def _batched_pays(probed: Probed) -> bool:
    """Whether the batched run is worth it where some use is tapped on its parameters under
    vmap (norms' affine parameters, broadcast scales and shifts). The batched run taps every use
    on its outputs (a tap on a parameter argument would give the sum over samples), so it keeps
    those outputs' cotangents, where vmap keeps their per-sample gradients, and their gradients
    come from a rule (layer_norm's closed form, else the generic rule: the op's per-sample
    vjp). It is taken where vmap cannot run fn at all (the alternative is a run per sample),
    and where it holds at most a quarter more records and cotangents per sample: a
    transformer's layer norms add about a tenth; a ResNet's group norms, one after every
    convolution, a third (batched: 309 against 250 MiB, and no faster). Within that bound
    vmap's cost on every op outweighs the rules' on those uses: HF GPT-2 tiny (eager attention,
    layer norms) 1.7x -> 1.1-1.2x a step, an MLP 784-256-256-10 with two layer norms (B = 64)
    2.4-2.5x -> 2.0x, MobileNetV3 (eval batch norm) 1.45x -> 1.4x.
    """
    if probed.tap_shapes == probed.output_tap_shapes or probed.looped:
        return True  # no use is tapped on its parameters
    records = sum(shape.numel() for shape in probed.record_shapes)
    vmapped = records + sum(shape.numel() for shape, _, _ in probed.tap_shapes)
    batched = records + sum(shape.numel() for shape, _, _ in probed.output_tap_shapes)
    return 4 * batched <= 5 * vmapped
