"""The tape: a record of every use of a parameter while ``fn`` runs.

A ``Tape`` is a ``TorchFunctionMode`` that lives for one run of ``fn``. It

- follows views of the parameter leaves (``chunk``, slices, transposes, ...), remembering for each
  view which elements of its leaf it holds (an index tensor, so that any rearrangement is exact;
  ``torchgram._views``);
- steps inside composite ``torch.nn.functional`` functions (multi-head attention, ...) so that the
  primitive ops they are made of are what gets recorded;
- records every other op that consumes a parameter or a view of one as a ``Use``: the op, its
  non-parameter inputs (returned from the run so that they outlive ``vmap``), and the shapes of its
  floating-point outputs (an op that returns the parameter view itself, such as dropout that drops
  nothing, is no use: the view goes on);
- adds a zero "tap" to each such output (second run), so that one reverse pass with respect to the
  taps yields the output cotangent of every use (with plain autograd it takes the output's
  gradient edge instead, and adds nothing); for ops whose parameters are small next to their
  output (norms' affine parameters, broadcast scales and biases: ``PARAMETER_TAPPED``) the taps go
  on the parameter arguments instead, and the reverse pass yields their per-sample gradients
  (under ``vmap``; fn run on the whole batch taps their outputs too, see ``Tape``'s
  ``on_outputs``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from torch.autograd.graph import GradientEdge

from torchgram._guards import Guard, NeedsTransform, Watching
from torchgram._internals import (
    dispatches,
    edge,
    in_custom_function,
    level,
    without_dispatch,
)
from torchgram._ops import elementwise, norm
from torchgram._ops.attention import is_attention, math_kernel
from torchgram._ops.recurrent import RNN_OPS, run_recurrent
from torchgram._ops.registered import rule_for
from torchgram._uses import (
    SCALARS,
    DataRef,
    ParamView,
    TapeMismatch,
    TapShape,
    Use,
    differentiable,
    may_mention,
    op_name,
)
from torchgram._views import CASTS, VIEW_OPS, follow_view, only_tensor, same_value

Tensor = torch.Tensor

# Ops whose parameters are small next to their output (the affine parameters of norms; scales,
# shifts and biases broadcast by elementwise ops): the taps go on the parameter arguments, so the
# pull-back yields their per-sample gradients directly and the output cotangent is never kept
# (except in a run on the whole batch, where such a tap would give the sum over samples).
PARAMETER_TAPPED = norm.TAPPED_ON_PARAMS | elementwise.TAPPED_ON_PARAMS


# an op given only scalars (and tensors) positionally has the flat structure of _flat_spec
_LEAF = optree.tree_structure(0, none_is_leaf=True)  # type: ignore[arg-type]


@functools.cache
def _flat_spec(count: int) -> Any:
    """The structure of ``(args, {})`` for ``count`` positional leaves."""
    return optree.tree_structure(((0,) * count, {}), none_is_leaf=True)  # type: ignore[arg-type]


def _output(view: Tensor) -> Tensor:
    """The use that fn's output is when it is a parameter view (see ``Tape.output``)."""
    return view


def _tap_meta(value: Tensor) -> TapShape:
    """Shape, dtype and device of a tapped tensor."""
    return value.shape, value.dtype, value.device


class Tape(Watching):
    """Records the uses of ``params`` while active; see the module docstring.

    Args:
        params: The flattened parameter leaves.
        taps: None for a first run (shapes only), else one zero tensor per tapped output, in order.
        caller: How to name the public call in error messages.
        per_sample: Whether ``batch_dim`` is set: ops that mix samples are refused then.
        vmapped: Whether ``fn`` runs under ``vmap`` over the samples (see ``_call``).
        on_outputs: Whether every use is tapped on its outputs, ``PARAMETER_TAPPED`` ops too (fn
            on the whole batch, where a tap on a parameter would give the sum over samples).
        math_attention: Whether attention runs on its math kernel, the one that vmap can batch:
            under vmap, and where the pull-back is batched over several rows. The fused CPU
            kernels have no batching rule (forward or backward), and vmap's fallback loops
            over the samples or rows (about 4x slower).

    A shape-only run (the probe: no taps, none made) also gives in ``output_shapes`` the
    shapes the taps would have on the outputs of every use (what a run ``on_outputs`` is checked
    against).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        taps: Sequence[Tensor] | None,
        caller: str,
        per_sample: bool,
        vmapped: bool = False,
        on_outputs: bool = False,
        math_attention: bool = False,
    ) -> None:
        super().__init__()
        self.caller = caller
        self.guard = Guard(caller, per_sample)
        self.vmapped = vmapped
        self.on_outputs = on_outputs
        self.math_attention = math_attention
        # (one-sample shapes of the taps, batch size): see _with_samples
        self.samples: tuple[list[torch.Size], int] | None = None
        self._given = tuple(params)
        self._given_views = {
            id(leaf): ParamView(position, leaf, None) for position, leaf in enumerate(self._given)
        }
        self.start(taps)

    def start(
        self,
        taps: Sequence[Tensor] | None,
        watch: bool = False,
        make_taps: bool = False,
        params: Sequence[Tensor] | None = None,
    ) -> None:
        """Begin a run with these taps (None: shapes only, or taps made by the run with no shapes
        to check them against), forgetting any earlier one.

        ``watch``: the run is plain autograd, so writes into tensors fn did not create are
        handed back (see ``torchgram._guards``). ``make_taps``: the run makes each tap itself
        when it meets the output (``taps`` then only give the shapes to check); they are in
        ``made``: the output's gradient edge where it has one of its own (then nothing is
        added to fn), else a leaf that requires grad, shaped like the output, added to it.
        ``params``: the leaves fn runs on this time, if not those given at construction
        (copies that require grad, so that every use's output has an edge).
        """
        self._params = self._given if params is None else tuple(params)
        self.taps = taps
        self.made: list[Tensor | GradientEdge] | None = [] if make_taps else None
        self.uses: list[Use] = []
        self.records: list[Tensor] = []
        self.tap_shapes: list[TapShape] = []
        self.output_shapes: list[TapShape] = []
        self.output_view = False  # fn's output is a parameter view (see output)
        self._shapes_only = taps is None and not make_taps  # the probe: output_shapes too
        # with copies, fn may still read the given leaves from a closure while the copies go
        # through its argument: a use of either is a use of the leaf
        self._views: dict[int, ParamView] = dict(self._given_views)
        if params is not None:
            self._views.update(
                (id(leaf), ParamView(position, leaf, None))
                for position, leaf in enumerate(self._params)
            )
        self.guard.start(watch)

    @property
    def weighted_norm(self) -> bool:
        """Whether fn called a norm whose weight vmap's double backward gets wrong (see
        ``torchgram._guards.WEIGHTED_NORMS``)."""
        return self.guard.weighted_norm

    @property
    def random(self) -> bool:
        """Whether fn used randomness in this run (then the sample check is skipped)."""
        return self.guard.random

    def __enter__(self) -> Tape:
        self._level = level()  # the torch.func level fn runs at (its own transforms go deeper)
        return super().__enter__()  # type: ignore[return-value]

    def output(self, out: Any) -> Any:
        """fn's output, made a use where it is a parameter or a view of one (``p.clone()``,
        ``p.expand(...)``): an identity whose tap gives its cotangent, the per-sample gradient
        of that view (without it no use would reach the output, and the Gramian would be 0).
        Called after fn returns, outside the tape's mode (the tap is no use of its own)."""
        view = self._views.get(id(out)) if isinstance(out, Tensor) else None
        if view is None:
            return out
        leaves, spec = [out], _flat_spec(1)
        self.output_view = True
        stored, data = self._store(leaves, [0])
        use = Use(_output, spec, stored, data, [0], None, [0], len(self.tap_shapes), True)
        self.uses.append(use)
        if self._shapes_only:
            self.output_shapes.append(_tap_meta(out))
        return self._tap(out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        self.guard.before(func, name, args, kwargs)
        if self.math_attention and is_attention(name):
            with math_kernel():
                return self.guard.after(name, args, self._dispatch(func, name, args, kwargs))
        return self.guard.after(name, args, self._dispatch(func, name, args, kwargs))

    def _dispatch(self, func: Callable[..., Any], name: str, args: Any, kwargs: dict) -> Any:
        if name in RNN_OPS and not kwargs:
            with self:
                return run_recurrent(name, args, self.caller)
        if not may_mention(args, kwargs, self._views):  # most ops
            return func(*args, **kwargs)
        views = self._views
        leaves: list[Any]
        if not kwargs and all(isinstance(v, Tensor) or type(v) in SCALARS for v in args):
            leaves, spec = list(args), _flat_spec(len(args))  # no need to flatten
        else:
            leaves, spec = optree.tree_flatten((args, kwargs), none_is_leaf=True)  # type: ignore[arg-type]
        slots = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and id(v) in views]
        if not slots:
            return func(*args, **kwargs)
        if level() != self._level:
            raise ValueError(
                f"{self.caller}: fn applies a torch.func transform of its own (vmap, grad, vjp, "
                f"jvp, ...) to a computation that uses the parameters ({name}). The tape "
                "records each use of a parameter where it runs fn, and cannot follow one inside "
                "a transform that fn opens. Move the transform out of fn (per-sample losses: "
                "batch_dim instead of vmap in fn), or apply it only to tensors that do not "
                "depend on the parameters."
            )
        self.guard.refuse_writes_reading_params(name, kwargs)
        if name in VIEW_OPS and only_tensor(leaves, slots, name):
            return follow_view(self._views, func, name, leaves, spec, slots[0])
        if name in CASTS and slots[0] == 0:
            out = func(*args, **kwargs)
            if same_value(self._views, out, leaves[0]):  # a cast to what it already is
                return out
            return self._record(func, leaves, spec, slots, out)
        if name in PARAMETER_TAPPED and not self.on_outputs:  # before stepping inside
            return self._record_on_params(func, leaves, spec, slots)
        if dispatches(func) and rule_for(func) is None:  # step inside, unless a rule takes it whole
            with self:
                return without_dispatch(func)(*args, **kwargs)
        out = self._call(func, name, args, kwargs)
        for i in slots:
            if out is leaves[i]:  # the parameter view itself: no use
                return out  # (dropout in eval mode, conj of a real tensor, ...)
        return self._record(func, leaves, spec, slots, out)

    def _call(self, func: Callable[..., Any], name: str, args: Any, kwargs: dict) -> Any:
        """``func(*args, **kwargs)``, except a linear map with a bias under ``vmap`` (one sample
        per call): the product, then the bias added in the product's dtype. vmap's own batching
        rule runs the same two ops, but under autocast adds the bias in float32, which promotes
        the output to float32 where fn alone computes in the autocast dtype. (No speed difference
        end to end, in A/B runs that alternate the order.)"""
        if self.vmapped and name == "linear" and len(args) == 3 and not kwargs:
            x, weight, bias = args
            autocast = torch.is_autocast_enabled(x.device.type)
            if isinstance(bias, Tensor) and (autocast or x.dtype == weight.dtype == bias.dtype):
                out = torch.nn.functional.linear(x, weight)
                return out + bias.to(out.dtype)
        return func(*args, **kwargs)

    def _record(
        self, func: Callable[..., Any], leaves: list[Any], spec: Any, slots: list[int], out: Any
    ) -> Any:
        single = isinstance(out, Tensor)  # most ops: no need to flatten
        if single:
            out_leaves, out_spec = [out], _LEAF
            tapped = [0] if differentiable(out) else []
        else:
            out_leaves, out_spec = optree.tree_flatten(out, none_is_leaf=True)
            tapped = [i for i, v in enumerate(out_leaves) if differentiable(v)]
        if not tapped:  # no differentiable output (sizes, masks, ...): nothing flows back
            return out
        stored, data = self._store(leaves, slots)
        use = Use(func, spec, stored, data, slots, out_spec, tapped, len(self.tap_shapes))
        self.uses.append(use)
        if self._shapes_only:
            self.output_shapes.extend(_tap_meta(out_leaves[i]) for i in tapped)
        for i in tapped:
            value = self._with_samples(out_leaves[i])
            # an output that is one of the op's inputs has no gradient edge of its own
            own = self.made is not None and all(value is not x for x in leaves)
            out_leaves[i] = self._tap(value, output=own)
        return out_leaves[0] if single else optree.tree_unflatten(out_spec, out_leaves)

    def _with_samples(self, value: Tensor) -> Tensor:
        """In a run on the whole batch (``samples``), an output that holds no samples (the same
        shape as on one sample: position embeddings of shared position ids) is expanded to the
        batch on its one dimension of size 1, so that its tap holds each sample's cotangent
        apart. The values fn computes do not change; where fn then relies on that dimension
        being 1, the run fails or its Gramian differs from the per-sample run's, and it is not
        used (see torchgram._run)."""
        if self.samples is None:
            return value
        ones, batch = self.samples
        position = len(self.tap_shapes)
        if position >= len(ones) or value.shape != ones[position]:
            return value
        single = [d for d, size in enumerate(value.shape) if size == 1]
        if len(single) != 1:
            return value
        shape = list(value.shape)
        shape[single[0]] = batch
        return value.expand(shape)

    def _record_on_params(
        self, func: Callable[..., Any], leaves: list[Any], spec: Any, slots: list[int]
    ) -> Any:
        """Record a use whose taps go on its parameter arguments (see ``PARAMETER_TAPPED``)."""
        stored, data = self._store(leaves, slots)
        use = Use(func, spec, stored, data, slots, None, slots, len(self.tap_shapes), True)
        self.uses.append(use)
        tapped = list(leaves)
        for i in slots:
            tapped[i] = self._tap(leaves[i])
        args, kwargs = optree.tree_unflatten(spec, tapped)
        out = func(*args, **kwargs)
        if self._shapes_only:
            outs = optree.tree_leaves(out, none_is_leaf=True)
            self.output_shapes.extend(_tap_meta(v) for v in outs if differentiable(v))
        return out

    def _store(self, leaves: list[Any], slots: list[int]) -> tuple[list[Any], list[int]]:
        """A use's leaves with ParamView and DataRef in place of tensors (the data recorded),
        and the positions of the data."""
        if self.made is not None and not torch.is_grad_enabled() and in_custom_function():
            # plain autograd differentiates the Function, not these ops: torch.func sees it as
            # one call, as the probe does
            raise NeedsTransform("a parameter used in a custom autograd.Function")
        stored: list[Any] = list(leaves)
        data: list[int] = []
        for i, value in enumerate(leaves):
            if i in slots:
                stored[i] = self._one_sample(self._views[id(value)])
            elif isinstance(value, Tensor):
                data.append(i)
                stored[i] = DataRef(len(self.records))
                self.records.append(value)
                self.guard.recorded(value)
        return stored, data

    def _one_sample(self, view: ParamView) -> ParamView:
        """In a run on the whole batch, a parameter view expanded to the batch on its first
        dimension (a class token, ``token.expand(B, -1, -1)``) is the same view for every
        sample: the rules replay each sample with its first slice, the view fn makes from one
        sample (checked on the first call against the vmapped run, as every batched run is)."""
        if self.samples is None or view.index is None:
            return view
        batch, shape = self.samples[1], view.tensor.shape
        if batch < 2 or not shape or shape[0] != batch:
            return view
        first = view.index[:1]
        if not bool((view.index == first).all()):
            return view
        return ParamView(view.leaf, view.tensor[:1], first)

    def _tap(self, value: Tensor, output: bool = False) -> Tensor:
        """``value`` with its tap (``output``: ``value`` is a new output of the op, none of its
        arguments, so that its gradient edge is its own)."""
        position = len(self.tap_shapes)
        self.tap_shapes.append(_tap_meta(value))
        taps = self.taps
        if taps is not None and (position >= len(taps) or taps[position].shape != value.shape):
            raise TapeMismatch(self.caller)
        if self.made is not None:
            node = value.grad_fn if output else None
            if node is not None:  # no op added: the output's own node
                self.made.append(edge(value, node))
                return value
            made = torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)
            self.made.append(made.requires_grad_())
            return value + made
        if taps is None:
            return value
        tap = taps[position]
        # Under autocast an op may give another dtype than in the probe: the tap takes the
        # output's dtype, so that fn computes exactly what it computes without the tape.
        return value + (tap if tap.dtype == value.dtype else tap.to(value.dtype))
