"""Rules that users register for their own ops (the public side is ``torchgram.rules``).

A registered rule sees one recorded call of its op with real tensors in place of the tape's
references (``Call``) and returns, for each parameter argument, its per-sample gradients in one
of two public forms; ``to_contributions`` checks them and turns them into the assembly's factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch

from torchgram._factors import Dense, Factor, Linear
from torchgram._uses import DataRef, ParamView, Use, positions

Tensor = torch.Tensor


@dataclass(frozen=True)
class Call:
    """One call of a registered op, as its rule sees it.

    The data tensors are stacked over the samples, ``[B, *sample]``: ``sample`` the shape of
    what the op received for one sample, which may keep a leading dimension of 1 (the sample as
    a batch of one, where fn ran on the whole batch at once) or not (where fn ran under vmap).
    Read them as tokens with ``call.tokens(x)``, ``[B, T, d]``, or reshape them yourself.
    Without ``batch_dim`` (a vector of losses over the whole batch) the whole call is one
    sample: ``B = 1``.

    Attributes:
        op: The function that was called.
        args: Its positional arguments: data tensors ``[B, ...]``, parameter arguments as they
            are (one parameter, or a view of one), everything else as passed.
        kwargs: Its keyword arguments, in the same form.
        params: The parameter arguments in the order they appear in ``(args, kwargs)``: the
            rule returns one gradient form for each, in this order.
        cotangents: One per floating-point output of the op, in order (flattened if the op
            returns several): ``[K, B, *out]``, ``out`` the output's shape for one sample (as
            for the data), the gradients of the K rows of the Gramian's output with respect to
            that output of the op, for each sample.
    """

    op: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    params: tuple[Tensor, ...]
    cotangents: tuple[Tensor, ...]

    @property
    def cotangent(self) -> Tensor:
        """The cotangent of the op's only floating-point output, ``[K, B, *out]``."""
        if len(self.cotangents) != 1:
            raise ValueError(
                f"Call.cotangent: the op has {len(self.cotangents)} floating-point outputs; "
                "read Call.cotangents instead."
            )
        return self.cotangents[0]

    @property
    def rows(self) -> int:
        """K, the rows of the Gramian's output per sample."""
        return self.cotangents[0].shape[0]

    @property
    def batch(self) -> int:
        """B, the samples."""
        return self.cotangents[0].shape[1]

    def tokens(self, x: Tensor) -> Tensor:
        """``x`` ``[B, *sample, d]`` as ``[B, T, d]``: every position of a sample but the last
        dimension is a token."""
        return x.reshape(self.batch, -1, x.shape[-1])


@dataclass(frozen=True)
class LinearGradients:
    """Per-sample gradients of a linear map used on T tokens: for row ``k`` and sample ``i``,
    ``sum_t D[k, i, t]ᵀ A[i, t]``, a ``[d_out, d_in]`` matrix laid over the parameter's elements
    in row-major order (a parameter of any shape with ``d_out * d_in`` elements).

    The Gramian of this form never builds the gradients when that is cheaper (the "ghost" form,
    ``<A_i A_jᵀ, D_i D_jᵀ>``), and joins with the other uses of the same parameter exactly.

    Attributes:
        A: Activations ``[B, T, d_in]`` (or ``[B, d_in]`` for one token).
        D: Output cotangents ``[K, B, T, d_out]`` (or ``[K, B, d_out]``).
    """

    A: Tensor
    D: Tensor


@dataclass(frozen=True)
class PerSampleGradients:
    """Per-sample gradients of one parameter argument, built in full: ``g`` ``[K, B, *shape]``,
    ``shape`` the parameter argument's shape."""

    g: Tensor


Gradients = LinearGradients | PerSampleGradients
UserRule = Callable[[Call], Sequence[Gradients] | None]

# op key -> rule. Global by nature, as Opacus's grad samplers are: registering is set-up code.
_REGISTERED: dict[Any, UserRule] = {}


def key(op: Any) -> Any:
    """What identifies an op however it is reached: a ``torch.library`` operator by its
    qualified name (the tape sees its overload or its packet), any other function by itself."""
    for attribute in ("_qualname", "_qualified_op_name"):  # CustomOpDef, OpOverloadPacket
        name = getattr(op, attribute, None)
        if isinstance(name, str):
            return name
    schema = getattr(op, "_schema", None)  # OpOverload
    if schema is not None:
        return schema.name
    return op


def register(op: Any, rule: UserRule) -> None:
    _REGISTERED[key(op)] = rule


def unregister(op: Any) -> UserRule | None:
    return _REGISTERED.pop(key(op), None)


def registered() -> dict[Any, UserRule]:
    return dict(_REGISTERED)


def rule_for(func: Any) -> UserRule | None:
    """The rule registered for ``func``, if any (checked once per recorded use)."""
    if not _REGISTERED:
        return None
    return _REGISTERED.get(key(func))


def to_contributions(
    rule: UserRule, use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[tuple[int, Factor]] | None:
    """Run a registered rule on a recorded use; None if it declines."""
    leaves = [
        records[v.record] if isinstance(v, DataRef) else v.tensor if isinstance(v, ParamView) else v
        for v in use.leaves
    ]
    args, kwargs = optree.tree_unflatten(use.spec, leaves)
    views: list[ParamView] = [use.leaves[slot] for slot in use.params]
    call = Call(
        use.func, tuple(args), dict(kwargs), tuple(v.tensor for v in views), tuple(cotangents)
    )
    found = rule(call)
    if found is None:
        return None
    name = getattr(rule, "__qualname__", repr(rule))
    if not isinstance(found, (list, tuple)) or len(found) != len(views):
        raise ValueError(
            f"the rule {name} registered for {use.name} returned {type(found).__name__}"
            f"{f' of length {len(found)}' if isinstance(found, (list, tuple)) else ''}; a rule "
            f"returns one LinearGradients or PerSampleGradients per parameter argument "
            f"({len(views)} here, in the order of Call.params), or None to leave the op to the "
            "generic rule."
        )
    K, B = cotangents[0].shape[:2] if cotangents else (0, 0)
    return [
        (view.leaf, _factor(form, view, K, B, f"the rule {name} registered for {use.name}"))
        for view, form in zip(views, found, strict=True)
    ]


def _factor(form: Any, view: ParamView, K: int, B: int, who: str) -> Factor:
    shape = view.tensor.shape
    if isinstance(form, PerSampleGradients):
        if tuple(form.g.shape) != (K, B, *shape):
            raise ValueError(
                f"{who} returned PerSampleGradients of shape {list(form.g.shape)} for a "
                f"parameter argument of shape {list(shape)}; expected [K, B, *shape] = "
                f"{[K, B, *shape]} (K rows, B samples, as the cotangents)."
            )
        return Dense(view.index, form.g)
    if isinstance(form, LinearGradients):
        A = form.A.unsqueeze(1) if form.A.dim() == 2 else form.A
        D = form.D.unsqueeze(2) if form.D.dim() == 3 else form.D
        if A.dim() != 3 or D.dim() != 4 or A.shape[:2] != D.shape[1:3] or D.shape[0] != K:
            raise ValueError(
                f"{who} returned LinearGradients with A {list(form.A.shape)} and D "
                f"{list(form.D.shape)}; expected A [B, T, d_in] and D [K, B, T, d_out] with the "
                f"same B and T (here K = {K}, B = {B})."
            )
        d_out, d_in = D.shape[-1], A.shape[-1]
        if d_out * d_in != shape.numel():
            raise ValueError(
                f"{who} returned LinearGradients of [d_out, d_in] = [{d_out}, {d_in}] for a "
                f"parameter argument of shape {list(shape)} ({shape.numel()} elements); "
                "d_out * d_in must equal its number of elements."
            )
        region = positions(view.index, shape).reshape(d_out, d_in)
        whole = view.index is None and tuple(shape) == (d_out, d_in)
        return Linear(None if whole else region, A, D)
    raise TypeError(
        f"{who} returned {type(form).__name__} for a parameter argument; expected "
        "LinearGradients or PerSampleGradients."
    )
