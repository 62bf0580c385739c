"""The three runs of ``fn`` with ``batch_dim``, whose rows are each sample's output elements.

- **vmapped**: fn under ``torch.func.vmap`` over the samples, each call seeing a batch of one, with
  zero taps of the shapes the probe learned on one sample. Exact for any fn that vmap can run.
- **batched**: fn on the whole batch without vmap (plain autograd, taps made as the run goes), the
  samples found in every tap and record by their one-sample shapes (see
  ``torchgram._batched``). None where that does not fit; whether its rows are the samples is
  checked against one of the other runs on a signature's first call (``torchgram._run``).
- **looped**: fn on each sample in turn (``torchgram._whole.linearise_whole`` on a batch of
  one), stacked as vmap stacks them: exact where vmap cannot run fn (data-dependent control flow,
  ``.item()``, a custom ``autograd.Function`` without ``setup_context``), at the cost of one run
  per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch.func import vmap

from torchgram._batched import SHARED, as_stacked, merged, sample_dim
from torchgram._linearised import Linearised, Options
from torchgram._memo import Probed
from torchgram._probe import check_taps, refuse_mutation, split_output
from torchgram._pytree import Inputs
from torchgram._reverse import Tap, linearise_made_taps, linearise_taps, pull_back
from torchgram._samples import agree
from torchgram._tape import Tape
from torchgram._uses import TapShape, Use
from torchgram._whole import _Aux, _zero_taps, linearise_whole, pull_rows

Tensor = torch.Tensor


def batch_size(inputs: Inputs, options: Options) -> int:
    """The number of samples, the same in every batched argument (checked)."""
    caller = options.caller
    batched = inputs.batched()
    if not batched:
        raise ValueError(
            f"{caller}: batch_dim={options.batch_dim} but no argument of fn holds samples "
            "(in_dims marks none as batched). If fn reads its data from a closure, pass the data "
            "as an argument of fn instead, so that its samples can be separated; or use "
            "batch_dim=None."
        )
    sizes = {i: inputs.data[i].shape[inputs.dims[i]] for i in batched}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(
            f"data leaf {i} has {size} at dim {inputs.dims[i]}" for i, size in sizes.items()
        )
        raise ValueError(
            f"{caller}: in_dims points at dimensions of different sizes ({listed}). All batched "
            "arguments must hold the same number of samples; fix in_dims (None for an argument "
            "without samples)."
        )
    size = next(iter(sizes.values()))
    if size == 0:
        raise ValueError(
            f"{caller}: the batch is empty (0 samples along in_dims), so fn cannot be run on a "
            "sample to learn the output's shape. Skip empty batches (e.g. DataLoader(..., "
            "drop_last=True)), or use batch_dim=None."
        )
    return size


def check_output(per_sample: torch.Size, options: Options) -> int:
    """The batch dimension of the per-sample output, checked (it must keep its batch of one)."""
    b = options.batch_dim
    assert b is not None
    rank = len(per_sample)
    if not -rank <= b < rank:
        raise ValueError(
            f"{options.caller}: batch_dim={b} is out of range for fn's output of shape "
            f"{list(per_sample)} (given one sample). Set batch_dim to the output dimension that "
            "indexes samples, or None."
        )
    b %= rank
    if per_sample[b] != 1:
        raise ValueError(
            f"{options.caller}: given a batch of one sample, fn returned shape {list(per_sample)}, "
            f"with size {per_sample[b]} at batch_dim={b}. batch_dim must be the output dimension "
            "that indexes samples (size 1 for one sample); check batch_dim and in_dims."
        )
    return b


def _merge(stacked: Tensor, b: int) -> Tensor:
    """``[B, *S1]`` with ``S1[b] == 1`` -> ``S1`` with B at ``b``."""
    return stacked.movedim(0, b).squeeze(b + 1)


def _merged_aux(spec: Any, leaves: list[Any], stacked: list[Tensor], b: int) -> Any:
    """aux with its tensors stacked on the samples ``[B, ...]``: at ``b`` where fn kept its batch
    of one there, else on a new leading dimension."""
    tensors = iter(_merge(x, b) if x.dim() > b + 1 and x.shape[b + 1] == 1 else x for x in stacked)
    return optree.tree_unflatten(
        spec, [next(tensors) if isinstance(x, Tensor) else x for x in leaves]
    )


def linearise_vmapped(
    fn: Callable[..., Any], inputs: Inputs, options: Options, probed: Probed, batch: int
) -> Linearised:
    """fn under vmap over the samples, with the taps the probe learned."""
    b = check_output(probed.shape, options)
    taps = _zero_taps(probed.tap_shapes, batch)
    tape = Tape(
        inputs.params, taps, options.caller, per_sample=True, vmapped=True, math_attention=True
    )
    dims = list(inputs.dims)
    aux_parts: list[Any] = []
    box = _Aux()

    def per_sample(taps: tuple[Tensor, ...], watch: bool, data: list[Any]) -> Any:
        tape.start(taps, watch)
        with tape:
            out, aux = split_output(inputs.call(fn, data), options.has_aux, options.caller)
        out = tape.output(out)
        leaves, spec = optree.tree_flatten(aux, none_is_leaf=True)
        aux_parts[:] = [spec, leaves]
        return out, tuple(tape.records), tuple(x for x in leaves if isinstance(x, Tensor))

    def run(taps: tuple[Tensor, ...], watch: bool) -> tuple[Tensor, Any]:
        one = [
            x if d is None else x.unsqueeze(d + 1) for x, d in zip(inputs.data, dims, strict=True)
        ]
        out, records, aux = vmap(
            lambda t, d: per_sample(t, watch, d), (0, dims), randomness="different"
        )(taps, one)
        check_output(out.shape[1:], options)
        spec, leaves = aux_parts
        return _merge(out, b), (records, box.pack(_merged_aux(spec, leaves, list(aux), b)))

    with refuse_mutation(options.caller):
        reverse = linearise_taps(run, taps)
    out, (records, aux) = reverse.out, reverse.aux
    check_taps(tape, probed, options.caller)
    per_sample_shape = torch.Size((*out.shape[:b], 1, *out.shape[b + 1 :]))
    cotangents = pull_rows(reverse, tape, per_sample_shape, probed) if taps else []
    return Linearised(
        out, box.unpack(aux), tape.uses, list(records), cotangents, inputs.params, b,
        options.chunk_bytes, random=tape.random, caller=options.caller,
    )  # fmt: skip


def linearise_looped(
    fn: Callable[..., Any], inputs: Inputs, options: Options, probed: Probed, batch: int
) -> Linearised:
    """fn on each sample in turn (a batch of one each), stacked as vmap stacks the samples."""
    b = check_output(probed.shape, options)
    runs = [
        linearise_whole(fn, inputs.sample(i), options, probed, per_sample=True)[0]
        for i in range(batch)
    ]
    first = runs[0]
    records = [torch.cat(parts) for parts in zip(*(run.records for run in runs), strict=True)]
    cotangents = [
        torch.cat(parts, dim=1) for parts in zip(*(run.cotangents for run in runs), strict=True)
    ]
    aux = None
    if options.has_aux:
        leaves, spec = optree.tree_flatten(first.aux, none_is_leaf=True)
        each = [optree.tree_leaves(run.aux, none_is_leaf=True) for run in runs]
        stacked = [
            torch.stack([run_leaves[i] for run_leaves in each])
            for i, x in enumerate(leaves)
            if isinstance(x, Tensor)
        ]
        aux = _merged_aux(spec, leaves, stacked, b)
    return Linearised(
        torch.cat([run.out for run in runs], dim=b), aux, first.uses, records, cotangents,
        inputs.params, b, options.chunk_bytes, random=any(run.random for run in runs),
        caller=options.caller,
    )  # fmt: skip


def linearise_batched(
    fn: Callable[..., Any],
    inputs: Inputs,
    options: Options,
    probed: Probed,
    batch: int,
    random: bool,
    reference: Linearised | None = None,
) -> Linearised | None:
    """fn on the whole batch without vmap; None where that cannot stand in for the vmapped run
    (then it is made another way, which gives the result or the error). ``random``: whether fn
    may draw random numbers (where the batched run was checked to draw what the others do).
    ``reference``: the vmapped (or looped) run of the first call, whose records tell where
    merged samples are the inner factor (``probed.inner``)."""
    b = check_output(probed.shape, options)
    several = probed.shape.numel() > 1  # attention's kernel must be one vmap can batch
    tape = Tape(
        inputs.params, None, options.caller, per_sample=True, on_outputs=True,
        math_attention=several,
    )  # fmt: skip
    tape.samples = ([shape for shape, _, _ in probed.output_tap_shapes], batch)

    def run(params: tuple[Tensor, ...]) -> tuple[Tensor, Any, list[Tap], list[TapShape]]:
        tape.start(None, watch=True, make_taps=True, params=params)
        with tape:
            out, _ = split_output(inputs.call(fn, inputs.data, params), False, options.caller)
        out = tape.output(out)
        return out, tuple(tape.records), tape.made or [], tape.tap_shapes

    try:
        reverse = linearise_made_taps(run, inputs.params)
    except Exception:  # the other runs raise what is wrong, if anything is
        return None
    if (tape.random and not random) or tape.output_view:
        return None
    out, records = reverse.out, reverse.aux
    shapes = [shape for shape, _, _ in tape.tap_shapes]
    tap_dims = _sample_dims(shapes, [shape for shape, _, _ in probed.output_tap_shapes], batch)
    record_dims = _sample_dims([r.shape for r in records], probed.record_shapes, batch)
    if tuple(out.shape) != (*probed.shape[:b], batch, *probed.shape[b + 1 :]):
        return None
    if tap_dims is None or SHARED in tap_dims or record_dims is None:
        return None  # a tap without samples would need one tap per sample: vmap's
    if reference is not None:
        probed.inner = _inner(records, record_dims, reference.records, batch)
    inner_taps = _inner_taps(tape.uses, probed.inner) if probed.inner else set()
    per_sample = torch.Size((*out.shape[:b], 1, *out.shape[b + 1 :]))
    cotangents: list[Tensor] = []
    if shapes:  # plain autograd: exact all at once
        cotangents, probed.apart = pull_back(reverse, per_sample, probed.apart)
    return Linearised(
        out,
        None,
        tape.uses,
        [
            as_stacked(r, d, 0, batch, i in probed.inner)
            for i, (r, d) in enumerate(zip(records, record_dims, strict=True))
        ],
        [
            as_stacked(c, d, 1, batch, i in inner_taps)
            for i, (c, d) in enumerate(zip(cotangents, tap_dims, strict=True))
        ],
        inputs.params,
        b,
        options.chunk_bytes,
        random=tape.random,
        caller=options.caller,
    )


def _inner(
    records: tuple[Tensor, ...], dims: list[int], reference: list[Tensor], batch: int
) -> frozenset[int]:
    """The records whose merged samples are the inner factor: those that equal the reference
    run's (``[B, *one]``) laid out so, and not as the outer factor. A use's output taps follow
    its records. The rows of the run are checked after, whatever this finds."""
    inner: set[int] = set()
    if len(reference) != len(records):  # not the same uses: the rows' check decides
        return frozenset()
    for i, (record, dim, expected) in enumerate(zip(records, dims, reference, strict=True)):
        if not merged(record, dim, batch) or _same(as_stacked(record, dim, 0, batch), expected):
            continue
        if _same(as_stacked(record, dim, 0, batch, inner=True), expected):
            inner.add(i)
    return frozenset(inner)


def _inner_taps(uses: list[Use], inner: frozenset[int]) -> set[int]:
    """The taps on the outputs of the uses that read a record in ``inner``: their cotangents
    are laid out as those records are."""
    return {
        tap
        for use in uses
        if any(use.leaves[slot].record in inner for slot in use.data)
        for tap in range(use.first_tap, use.first_tap + len(use.tapped))
    }


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return agree(a, b) if b.is_floating_point() else torch.equal(a, b)


def _sample_dims(shapes: list[torch.Size], ones: list[torch.Size], batch: int) -> list[int] | None:
    """``sample_dim`` of every tensor, or None if the counts or any shape do not fit."""
    if len(shapes) != len(ones):
        return None
    dims = [sample_dim(shape, one, batch) for shape, one in zip(shapes, ones, strict=True)]
    return None if None in dims else dims  # type: ignore[return-value]
