"""The run of ``fn`` on all its data at once: every call without ``batch_dim``, and each sample of
a looped run (see ``torchgram._per_sample``).

Its rows are fn's output elements. Outside ``torch.func`` transforms it is plain autograd on copies
of the parameters that require grad, and each use's output is taken by its gradient edge as the
run meets it (see ``torchgram._reverse.linearise_made_taps``): nothing needs to be known
before the run, so fn runs once. Where that cannot be (inside a transform, inference mode, a
custom ``autograd.Function``, a write fn must be refused for), the run takes zero taps of the
shapes a probe learned (see ``torchgram._probe``) and ``torch.func.vjp`` or leaf taps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

from torchgram._factors import Linear, ghost_cost, materialised_cost, use_ghost
from torchgram._guards import NeedsTransform, restore
from torchgram._linearised import Linearised, Options
from torchgram._memo import Probed
from torchgram._probe import check_taps, refuse_mutation, split_output
from torchgram._pytree import Inputs
from torchgram._reverse import (
    Reverse,
    Tap,
    Unmade,
    linearise_made_taps,
    linearise_params,
    linearise_taps,
    plain_autograd,
    pull_back,
    transform_active,
)
from torchgram._tape import Tape
from torchgram._uses import TapShape
from torchgram._watch import Watch

Tensor = torch.Tensor


def linearise_whole(
    fn: Callable[..., Any],
    inputs: Inputs,
    options: Options,
    probed: Probed | None,
    per_sample: bool = False,
) -> tuple[Linearised, Probed]:
    """fn on ``inputs`` under the tape, one batch of rows: its output elements.

    ``probed``: what a probe (or an earlier run) learned on this signature; None to learn it
    from this run, which then must be plain autograd with made taps (it raises
    ``torchgram._guards.NeedsTransform`` or ``torchgram._reverse.Unmade`` where it
    cannot be: then probe and call again). ``per_sample``: the data is one sample of a looped
    run (ops that mix samples are refused). Returns the run and what it learned.
    """
    known = probed is not None
    taps = _zero_taps(probed.tap_shapes, None) if probed is not None else ()
    # several rows (or not known yet): attention's kernel must be one vmap can batch
    several = probed is None or probed.shape.numel() > 1
    tape = Tape(
        inputs.params, taps if known else None, options.caller, per_sample, math_attention=several
    )
    box = _Aux()

    def run(
        taps: tuple[Tensor, ...] | None, watch: bool, params: tuple[Tensor, ...] | None = None
    ) -> tuple[Tensor, Any]:
        tape.start(taps, watch, make_taps=params is not None, params=params)
        with tape:
            out, aux = split_output(
                inputs.call(fn, inputs.data, params), options.has_aux, options.caller
            )
        out = tape.output(out)
        if params is not None and options.has_aux:
            aux = _originals(aux, params, inputs.params)
        return out, (tuple(tape.records), box.pack(aux))

    def made(params: tuple[Tensor, ...]) -> tuple[Tensor, Any, list[Tap], list[TapShape]]:
        out, aux = run(taps if known else None, True, params)
        return out, aux, tape.made or [], tape.tap_shapes

    with refuse_mutation(options.caller):
        if probed is None:
            reverse = linearise_made_taps(made, inputs.params)
        else:
            reverse = linearise_taps(
                run,
                taps,
                made if probed.made_taps else None,
                inputs.params,
                autograd=not probed.custom_function,
            )
    out, (records, aux) = reverse.out, reverse.aux
    if probed is None:
        probed = _learned(tape, out, records)
    else:
        if reverse.made is False:  # not tried again on this signature
            probed.made_taps = False
        check_taps(tape, probed, options.caller)
    pulled = tape.tap_shapes and out.numel()
    cotangents = pull_rows(reverse, tape, out.shape, probed) if pulled else []
    linearised = Linearised(
        out,
        box.unpack(aux),
        tape.uses,
        [r.unsqueeze(0) for r in records],
        [c.unsqueeze(1) for c in cotangents],
        inputs.params,
        None,
        options.chunk_bytes,
        random=tape.random,
        statistics=tape.guard.statistics,
        caller=options.caller,
    )
    return linearised, probed


def _originals(aux: Any, copies: tuple[Tensor, ...], params: tuple[Tensor, ...]) -> Any:
    """``aux`` with the caller's parameters in place of the copies a run made of them."""
    originals = {id(c): p for c, p in zip(copies, params, strict=True)}
    return optree.tree_map(
        lambda x: originals.get(id(x), x) if isinstance(x, Tensor) else x, aux, none_is_leaf=True
    )


def linearise_to_params(fn: Callable[..., Any], inputs: Inputs, options: Options) -> Linearised:
    """fn on ``inputs`` without the tape, its rows pulled back to the parameters one at a time
    (plain autograd; see ``gradients_pay`` for where it pays): each leaf's gradients of the rows
    are its factor. One row at a time holds one row's cotangents of fn's activations, not K,
    and needs no ``vmap`` of any backward formula. Only outside ``torch.func`` transforms
    (``torchgram._reverse.plain_autograd``)."""
    box = _Aux()
    watches: list[Watch] = []

    def run(params: tuple[Tensor, ...]) -> tuple[Tensor, Any]:
        watch = Watch(inputs.params, params, options.caller)
        watches.append(watch)
        with watch:
            call = inputs.call(fn, inputs.data, params)
            out, aux = split_output(call, options.has_aux, options.caller)
        out = watch.copy(out)
        return out, box.pack(_originals(aux, params, inputs.params) if options.has_aux else aux)

    try:
        reverse = linearise_params(run, inputs.params)
        out = reverse.out
        try:
            gradients = pull_back(reverse, out.shape, apart=True)[0] if out.numel() else []
        except RuntimeError as error:  # a backward formula torch cannot run here
            raise Unmade from error
    except (NeedsTransform, Unmade):  # the caller makes the run the taps' way
        for watch in watches:
            restore(watch.guard.statistics)
        raise
    return Linearised(
        out,
        box.unpack(reverse.aux),
        [],
        [],
        [],
        inputs.params,
        None,
        options.chunk_bytes,
        random=watches[0].guard.random,
        statistics=watches[0].guard.statistics,
        caller=options.caller,
        gradients=gradients,
    )


def may_pull_to_params(probed: Probed, inputs: Inputs) -> bool:
    """Whether this call runs ``linearise_to_params``: chosen on the signature (see
    ``gradients_pay``), a run of plain autograd whose Gramian needs no graph (parameters or
    data that require grad: a fused kernel fn calls may have no double backward)."""
    if not probed.to_params or probed.custom_function or not plain_autograd(inputs.params):
        return False
    if not torch.is_grad_enabled():
        return True
    tensors = (*inputs.params, *optree.tree_leaves(inputs.data, none_is_leaf=True))  # type: ignore[arg-type]
    return not any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def gradients_pay(run: Linearised) -> bool:
    """Whether later calls on the signature of ``run`` (a plain autograd run with made taps)
    should pull the rows back to the parameters (``linearise_to_params``) instead of the taps.

    Both ways pull every row back through fn. To the taps, the rules then build each row's
    gradient of a linear map (``K * T * d_in * d_out`` multiply-adds for ``T`` tokens), unless
    the ghost form is cheaper; to the parameters, autograd's backward builds the same gradients
    itself, without the tape (a recurrent op then runs fused, not step by step) and without a
    rule's per-use cost. So it pays where the ghost form saves less than half of the linear
    maps' work, and where the rows' gradients (``K`` times the parameters) take no more memory
    than the taps' cotangents and one chunk (``max_chunk_bytes``), which the pull-back to the
    taps holds.
    """
    rows = run.out.numel()
    if run.out.requires_grad:  # the Gramian carries a graph: see may_pull_to_params
        return False
    gradients = rows * sum(p.numel() * p.element_size() for p in run.params)
    held = sum(c.numel() * c.element_size() for c in run.cotangents) + run.chunk_bytes
    if not rows or gradients > held:
        return False
    materialised = saved = 0
    for _, factor in run.contributions:
        if isinstance(factor, Linear):
            cost = materialised_cost(factor.A.shape, factor.D.shape)
            materialised += cost
            if use_ghost(factor.A.shape, factor.D.shape):
                saved += max(0, cost - ghost_cost(factor.A.shape, factor.D.shape))
    return 2 * saved <= materialised


def _learned(tape: Tape, out: Tensor, records: tuple[Tensor, ...]) -> Probed:
    """What a probe would have learned, from a run that made its taps."""
    return Probed(
        list(tape.tap_shapes),
        out.shape,
        record_shapes=[r.shape for r in records],
    )


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


def _zero_taps(shapes: list[TapShape], batch: int | None) -> tuple[Tensor, ...]:
    """One zero per tapped output: a broadcast scalar (one per dtype and device), so the taps
    take no memory."""
    lead = () if batch is None else (batch,)
    zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}
    for _, dtype, device in shapes:
        if (dtype, device) not in zeros:
            zeros[dtype, device] = torch.zeros((), dtype=dtype, device=device)
    return tuple(zeros[dtype, device].expand((*lead, *shape)) for shape, dtype, device in shapes)


def pull_rows(reverse: Reverse, tape: Tape, per_sample: torch.Size, probed: Probed) -> list[Tensor]:
    """``torchgram._reverse.pull_back``, all rows at once or one at a time, whichever the
    first call on the signature found faster (``probed.apart``). Always one at a time under
    ``torch.func.vjp`` where the Gramian is differentiated (an outer ``grad``, or ``jvp``) and
    fn calls a norm whose affine weight depends on the parameters
    (``torchgram._guards.WEIGHTED_NORMS``): there torch 2.13's ``vmap`` over the rows of a
    pull-back gives the right gradients of the weight but wrong derivatives of them (of the
    Gramian): layer_norm's with ``batch_dim=None`` were 5.1e3 off, against the loop of
    ``autograd.grad`` over rows and the closed form (jacrev has the same fault). Plain
    autograd's batched pull-back (``is_grads_batched``) is exact there."""
    forced = (  # the cheap tests first: this runs on every call
        tape.weighted_norm
        and reverse.functional
        and (reverse.differentiable or transform_active("Jvp"))
    )
    if forced:
        return pull_back(reverse, per_sample, apart=True)[0]
    cotangents, probed.apart = pull_back(reverse, per_sample, probed.apart)
    return cotangents
