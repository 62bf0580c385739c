"""Run ``fn`` under the tape and pull back one-hot cotangents to every tap.

Two runs of ``fn`` (see :mod:`torchgram._probe` for the first):

1. a probe that only learns the shapes of the tapped tensors (with ``batch_dim``, on a batch of
   one sample, which is what every vmapped call sees);
2. the real run, differentiated with respect to zero taps added to those tensors (plain autograd,
   or ``torch.func.vjp`` inside a transform: see :mod:`torchgram._reverse`; with ``batch_dim``,
   under ``torch.func.vmap`` over the samples, each call seeing a batch of one). Its first two
   samples are then compared with fn run on them as one batch, which catches ops that mix
   samples. Outside transforms, where every tap holds the samples on one dimension, the run is
   fn on the whole batch instead, without vmap's cost on every op (see
   :mod:`torchgram._batched`; uses that vmap taps on their parameters are tapped on their
   outputs there, where that pays: :func:`_batched_pays`). The first such run on each
   signature is compared with the vmapped run (their outputs: the sample check; their
   Gramians: the batched run's rows must be the samples), and is used on that signature only if
   both agree.

One reverse pass then pulls back one one-hot cotangent per non-batch output element (batched),
which gives the cotangents ``[K, B, ...]`` of every tap: of a use's output, or, for a use tapped
on its parameters, the per-sample gradients of those parameters. Gradients of whole parameter
leaves are never formed.

A transform built once (``gramian_of``, ``jd_grad``) remembers what the probe learned, and that the
sample check passed, per signature of its arguments (see :mod:`torchgram._memo`), so that a
training loop runs fn once per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch.func import vmap

from torchgram._batched import SHARED, as_stacked, sample_dim
from torchgram._linearised import Linearised, Options
from torchgram._memo import Probed, Probes, signature
from torchgram._probe import check_taps, probe, refuse_mutation, split_output
from torchgram._pytree import Inputs
from torchgram._reverse import (
    Reverse,
    Tap,
    inside_func_transform,
    linearise_made_taps,
    linearise_taps,
    may_make_taps,
    pull_back,
    transform_active,
)
from torchgram._samples import agree, check_samples, compare
from torchgram._tape import Tape, TapeMismatch, TapShape

Tensor = torch.Tensor


def linearise(
    fn: Callable[..., Any], inputs: Inputs, options: Options, probes: Probes | None = None
) -> Linearised:
    """Run ``fn`` on ``inputs`` under the tape; see the module docstring.

    ``probes``: the calling transform's memory of earlier probes (None: probe every time).
    """
    run = _linearise_whole if options.batch_dim is None else _linearise_per_sample
    key = None if probes is None else signature(inputs, options.batch_dim, options.has_aux)
    remembered = None if probes is None else probes.take(key)
    if remembered is not None:
        with contextlib.suppress(TapeMismatch):  # fn uses its parameters differently now
            result = run(fn, inputs, options, remembered)
            probes.keep(key, remembered)  # type: ignore[union-attr]
            return result
    probed = probe(fn, inputs, options.batch_dim is not None, options.has_aux, options.caller)
    if key is None:  # nothing is remembered: the batched run's first-time comparison would not pay
        probed.batched = False
    result = run(fn, inputs, options, probed)
    if probes is not None:
        probes.keep(key, probed)
    return result


class _Aux:
    """Carries aux across ``vjp`` (which takes only tensors): the structure stays here."""

    def __init__(self) -> None:
        self._spec: Any = None
        self._leaves: list[Any] = []

    def pack(self, aux: Any) -> tuple[Tensor, ...]:
        self._leaves, self._spec = optree.tree_flatten(aux, none_is_leaf=True)
        return tuple(x for x in self._leaves if isinstance(x, Tensor))

    def unpack(self, tensors: tuple[Tensor, ...]) -> Any:
        given = iter(tensors)
        leaves = [next(given) if isinstance(x, Tensor) else x for x in self._leaves]
        return optree.tree_unflatten(self._spec, leaves)


def _zero_taps(
    shapes: list[tuple[torch.Size, torch.dtype, torch.device]], batch: int | None
) -> tuple[Tensor, ...]:
    """One zero per tapped output: a broadcast scalar (one per dtype and device), so the taps
    take no memory."""
    lead = () if batch is None else (batch,)
    zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}
    for _, dtype, device in shapes:
        if (dtype, device) not in zeros:
            zeros[dtype, device] = torch.zeros((), dtype=dtype, device=device)
    return tuple(zeros[dtype, device].expand((*lead, *shape)) for shape, dtype, device in shapes)


def _linearise_whole(
    fn: Callable[..., Any], inputs: Inputs, options: Options, probed: Probed
) -> Linearised:
    taps = _zero_taps(probed.tap_shapes, None)
    tape = Tape(inputs.params, taps, options.caller, per_sample=False)
    box = _Aux()

    several = _batched_attention(probed)

    def run(
        taps: tuple[Tensor, ...], watch: bool, params: tuple[Tensor, ...] | None = None
    ) -> tuple[Tensor, Any]:
        tape.start(taps, watch, make_taps=params is not None, params=params)
        with _batchable_attention(several), tape:
            out, aux = split_output(
                inputs.call(fn, inputs.data, params), options.has_aux, options.caller
            )
        if params is not None and options.has_aux:  # the caller's parameters, not the copies
            originals = {id(c): p for c, p in zip(params, inputs.params, strict=True)}
            aux = optree.tree_map(
                lambda x: originals.get(id(x), x) if isinstance(x, Tensor) else x,
                aux,
                none_is_leaf=True,
            )
        return out, (tuple(tape.records), box.pack(aux))

    def made(params: tuple[Tensor, ...]) -> tuple[Tensor, Any, list[Tap], list[TapShape]]:
        out, aux = run(taps, True, params)
        return out, aux, tape.made or [], tape.tap_shapes

    with refuse_mutation(options.caller):
        reverse = linearise_taps(
            run,
            taps,
            made if probed.made_taps else None,
            inputs.params,
            autograd=not probed.custom_function,
        )
    if reverse.made is False:  # not tried again on this signature
        probed.made_taps = False
    out, (records, aux) = reverse.out, reverse.aux
    check_taps(tape, probed, options.caller)
    aux = box.unpack(aux)
    cotangents = _pull_back(reverse, tape, out.shape) if taps else []
    return Linearised(
        out,
        aux,
        tape.uses,
        [r.unsqueeze(0) for r in records],
        [c.unsqueeze(1) for c in cotangents],
        inputs.params,
        None,
        options.chunk_bytes,
    )


def _pull_back(reverse: Reverse, tape: Tape, per_sample: torch.Size) -> list[Tensor]:
    """:func:`pull_back`, the rows one at a time under ``torch.func.vjp`` where the Gramian is
    differentiated (an outer ``grad``, or ``jvp``) and fn calls a norm whose affine weight
    depends on the parameters (``torchgram._guards.WEIGHTED_NORMS``). There torch 2.13's
    ``vmap`` over the rows of a pull-back gives the right gradients of the weight but wrong
    derivatives of them (of the Gramian): layer_norm's with ``batch_dim=None`` were 5.1e3 off,
    against the loop of ``autograd.grad`` over rows and the closed form (jacrev has the same
    fault). Plain autograd's batched pull-back (``is_grads_batched``) is exact there."""
    apart = (  # the cheap tests first: this runs on every call
        tape.weighted_norm
        and reverse.functional
        and (reverse.differentiable or transform_active("Jvp"))
    )
    return pull_back(reverse, per_sample, row_by_row=apart)


def _batch_size(inputs: Inputs, options: Options) -> int:
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
    return next(iter(sizes.values()))


def _check_output(per_sample: torch.Size, options: Options) -> int:
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


def _vmapped(
    fn: Callable[..., Any], inputs: Inputs, options: Options, tape: Tape, attention: bool = True
) -> Callable[[list[Any], tuple[Tensor, ...], bool], tuple[Tensor, tuple[Tensor, ...], Any, int]]:
    """fn over the samples, each call seeing a batch of one, under ``tape``.

    The returned function ``run(data, taps, watch)`` gives ``(out, records, aux, batch_dim)``: out
    ``S``, the records ``[B, ...]``, aux with its tensors stacked on the samples, and the
    non-negative batch_dim (``watch``: see :meth:`Tape.start`).
    """
    dims = list(inputs.dims)
    aux_parts: list[Any] = []
    watching = [False]

    def per_sample(taps: tuple[Tensor, ...], data: list[Any]) -> Any:
        tape.start(taps, watching[0])
        with tape:
            out, aux = split_output(inputs.call(fn, data), options.has_aux, options.caller)
        leaves, spec = optree.tree_flatten(aux, none_is_leaf=True)
        aux_parts[:] = [spec, leaves]
        return out, tuple(tape.records), tuple(x for x in leaves if isinstance(x, Tensor))

    def run(data: list[Any], taps: tuple[Tensor, ...], watch: bool = False):
        watching[0] = watch
        one = [x if d is None else x.unsqueeze(d + 1) for x, d in zip(data, dims, strict=True)]
        with _batchable_attention(attention):
            out, records, aux_tensors = vmap(per_sample, (0, dims), randomness="different")(
                taps, one
            )
        b = _check_output(out.shape[1:], options)
        spec, leaves = aux_parts
        stacked = iter(
            _merge(x, b) if x.dim() > b + 1 and x.shape[b + 1] == 1 else x for x in aux_tensors
        )
        leaves = [next(stacked) if isinstance(x, Tensor) else x for x in leaves]
        return _merge(out, b), records, optree.tree_unflatten(spec, leaves), b

    return run


def _batched_attention(probed: Probed) -> bool:
    """Whether a plain autograd run needs attention's math kernel: fn calls attention and the
    pull-back is batched over several rows (``is_grads_batched``, a vmap)."""
    return probed.shape.numel() > 1 and probed.attention


def _batchable_attention(needed: bool = True) -> contextlib.AbstractContextManager[Any]:
    """The math kernel of scaled_dot_product_attention: the fused CPU kernels have no vmap
    batching rule (forward or backward), and vmap's fallback would loop over the samples or
    output elements (about 4x slower). ``needed``: whether fn calls attention (choosing the
    kernel costs about 10 us a call)."""
    if not needed:
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _linearise_per_sample(
    fn: Callable[..., Any], inputs: Inputs, options: Options, probed: Probed
) -> Linearised:
    batch = _batch_size(inputs, options)
    if _may_batch(options, inputs, probed, batch):
        batched = _linearise_batched(fn, inputs, options, probed, batch)
        if batched is None:
            probed.batched = False
        elif probed.batched:
            return batched
        else:  # the first time on this signature: compared with the vmapped run
            vmapped = _linearise_vmapped(fn, inputs, options, probed, batch, check=False)
            return _verified(batched, vmapped, probed, options)
    return _linearise_vmapped(fn, inputs, options, probed, batch)


def _verified(
    batched: Linearised, vmapped: Linearised, probed: Probed, options: Options
) -> Linearised:
    """The first batched run on a signature, against the vmapped one: their outputs must agree
    (the sample check, on the whole batch), and so must their Gramians, or the batched run is
    not used again on this signature (its rows are not the samples it takes them for: fn
    reorders the samples, or builds a parameter view whose shape depends on the batch size).
    Returns the one to use now."""
    with torch.no_grad():
        compare(batched.out.detach(), vmapped.out.detach(), options, "on the whole batch")
        probed.samples_checked = True
        expected = vmapped.gramian()
        try:
            probed.batched = agree(batched.gramian(), expected)
        except Exception:  # the rules cannot replay a use of the batched run sample by sample
            probed.batched = False
    chosen = batched if probed.batched else vmapped
    # the factors were made without grad: made again for the Gramian returned, which may need
    # a graph (parameters or data that require grad)
    chosen.__dict__.pop("contributions", None)
    return chosen


def _linearise_vmapped(
    fn: Callable[..., Any],
    inputs: Inputs,
    options: Options,
    probed: Probed,
    batch: int,
    check: bool = True,
) -> Linearised:
    """fn under vmap over the samples (``check``: the sample check, if it is due)."""
    b = _check_output(probed.shape, options)
    taps = _zero_taps(probed.tap_shapes, batch)
    tape = Tape(inputs.params, taps, options.caller, per_sample=True, vmapped=True)
    run = _vmapped(fn, inputs, options, tape, probed.attention)

    box = _Aux()

    def differentiable(taps: tuple[Tensor, ...], watch: bool) -> tuple[Tensor, Any]:
        out, records, aux, _ = run(list(inputs.data), taps, watch)
        return out, (records, box.pack(aux))

    with refuse_mutation(options.caller):
        reverse = linearise_taps(differentiable, taps)
    out, (records, aux) = reverse.out, reverse.aux
    check_taps(tape, probed, options.caller)
    aux = box.unpack(aux)
    check = check and options.check_samples and not probed.samples_checked and batch >= 2
    if check and not tape.random and not transform_active("Vmap"):
        with torch.no_grad():
            check_samples(fn, inputs, inputs.first(2), out.detach().narrow(b, 0, 2), options)
        probed.samples_checked = True
    per_sample = torch.Size((*out.shape[:b], 1, *out.shape[b + 1 :]))
    cotangents = _pull_back(reverse, tape, per_sample) if taps else []
    return Linearised(
        out, aux, tape.uses, list(records), cotangents, inputs.params, b, options.chunk_bytes
    )


def _may_batch(options: Options, inputs: Inputs, probed: Probed, batch: int) -> bool:
    """Whether to try the batched run (see :mod:`torchgram._batched`): plain autograd must be
    possible (outside transforms and inference mode, with parameters that can have copies that
    require grad: no inference tensors), it must pay where uses are tapped on their parameters
    (see :func:`_batched_pays`), and aux must not be stacked from per-sample calls. The sample
    check must run or have passed: without it the batched and the per-sample function may
    differ."""
    return (
        probed.batched is not False
        and batch >= 2
        and may_make_taps(inputs.params)
        and _batched_pays(probed)
        and not options.has_aux
        and not probed.custom_function  # plain autograd would not see it as the probe did
        and (options.check_samples or probed.samples_checked)
        and not inside_func_transform()
        and not torch.is_inference_mode_enabled()
    )


def _batched_pays(probed: Probed) -> bool:
    """Whether the batched run is worth it where some use is tapped on its parameters under
    vmap (norms' affine parameters, broadcast scales and shifts). The batched run taps every use
    on its outputs (a tap on a parameter argument would give the sum over samples), so it keeps
    those outputs' cotangents, where vmap keeps their per-sample gradients, and their gradients
    come from a rule (layer_norm's closed form, else the generic rule: the op's per-sample
    vjp). It is taken where

    - fn calls attention, whose fused kernels vmap cannot batch (under vmap it runs the math
      kernel): the benchmark's transformer, 1.56x -> 1.26x a step; without attention the
      generic rule costs more than vmap saves (an MLP with two layer norms: 8.3-8.6 against
      6.2-7.2 ms);
    - and it holds at most a quarter more records and cotangents per sample: a transformer's
      layer norms add about a tenth; a ResNet's group norms, one after every convolution, a
      third (batched: 309 against 250 MiB, and no faster).
    """
    if probed.tap_shapes == probed.output_tap_shapes:
        return True  # no use is tapped on its parameters
    records = sum(shape.numel() for shape in probed.record_shapes)
    vmapped = records + sum(shape.numel() for shape, _, _ in probed.tap_shapes)
    batched = records + sum(shape.numel() for shape, _, _ in probed.output_tap_shapes)
    return probed.attention and 4 * batched <= 5 * vmapped


def _linearise_batched(
    fn: Callable[..., Any], inputs: Inputs, options: Options, probed: Probed, batch: int
) -> Linearised | None:
    """fn on the whole batch without vmap; None where that cannot stand in for the vmapped run
    (then it is made under vmap, which gives the result or the error)."""
    b = _check_output(probed.shape, options)
    tape = Tape(inputs.params, None, options.caller, per_sample=True, on_outputs=True)
    several = _batched_attention(probed)

    def run(params: tuple[Tensor, ...]) -> tuple[Tensor, Any, list[Tap], list[TapShape]]:
        tape.start(None, watch=True, make_taps=True, params=params)
        with _batchable_attention(several), tape:
            out, _ = split_output(inputs.call(fn, inputs.data, params), False, options.caller)
        return out, tuple(tape.records), tape.made or [], tape.tap_shapes

    try:
        reverse = linearise_made_taps(run, inputs.params)
    except Exception:  # the vmapped run raises what is wrong, if anything is
        return None
    if tape.random:
        return None  # only vmap gives each sample its own random draws
    out, records = reverse.out, reverse.aux
    shapes = [shape for shape, _, _ in tape.tap_shapes]
    tap_dims = _sample_dims(shapes, [shape for shape, _, _ in probed.output_tap_shapes], batch)
    record_dims = _sample_dims([r.shape for r in records], probed.record_shapes, batch)
    if tuple(out.shape) != (*probed.shape[:b], batch, *probed.shape[b + 1 :]):
        return None
    if tap_dims is None or SHARED in tap_dims or record_dims is None:
        return None  # a tap without samples would need one tap per sample: vmap's
    per_sample = torch.Size((*out.shape[:b], 1, *out.shape[b + 1 :]))
    cotangents = pull_back(reverse, per_sample) if shapes else []  # plain autograd: exact
    return Linearised(
        out,
        None,
        tape.uses,
        [as_stacked(r, d, 0, batch) for r, d in zip(records, record_dims, strict=True)],
        [as_stacked(c, d, 1, batch) for c, d in zip(cotangents, tap_dims, strict=True)],
        inputs.params,
        b,
        options.chunk_bytes,
    )


def _sample_dims(shapes: list[torch.Size], ones: list[torch.Size], batch: int) -> list[int] | None:
    """:func:`sample_dim` of every tensor, or None if the counts or any shape do not fit."""
    if len(shapes) != len(ones):
        return None
    dims = [sample_dim(shape, one, batch) for shape, one in zip(shapes, ones, strict=True)]
    return None if None in dims else dims  # type: ignore[return-value]
