"""Per-use rules: a recorded use, its inputs and its output cotangents -> gradient factors.

Each rule returns ``(leaf, factor)`` pairs, one per parameter argument of the use. A rule only
applies when the use has the shape it knows (e.g. ``linear`` with a parameter weight and a data
input); otherwise the generic rule, exact for every op, takes over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from torch.func import vjp, vmap

from torchgram._factors import Dense, Factor, Linear
from torchgram._tape import DataRef, ParamView, Use

Tensor = torch.Tensor
Contribution = tuple[int, Factor]


def use_factors(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution]:
    """The gradient factors of every parameter argument of ``use``.

    Args:
        use: The recorded use.
        records: All recorded data tensors, each ``[B, ...]`` (per-sample shape after B).
        cotangents: The cotangents of this use's tapped outputs, each ``[K, B, *out_shape]``.
    """
    rule = _RULES.get(use.name)
    if rule is not None:
        factors = rule(use, records, cotangents)
        if factors is not None:
            return factors
    return generic_factors(use, records, cotangents)


def generic_factors(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution]:
    """Exact for any op: the per-sample vjp of this one op, under vmap over samples and rows."""
    views: list[ParamView] = [use.leaves[slot] for slot in use.params]
    data = [records[use.leaves[slot].record] for slot in use.data]

    def one_row(data_i: list[Tensor], cotangent_i: list[Tensor]) -> tuple[Tensor, ...]:
        def op(*params: Tensor) -> tuple[Tensor, ...]:
            leaves = optree.tree_leaves(use.call(params, data_i), none_is_leaf=True)
            return tuple(leaves[i] for i in use.tapped)

        _, pullback = vjp(op, *(view.tensor for view in views))  # type: ignore[misc]
        return pullback(tuple(cotangent_i))

    per_sample = vmap(one_row, in_dims=(0, 0), randomness="same")
    grads = vmap(per_sample, in_dims=(None, 0), randomness="same")(data, list(cotangents))
    return [(view.leaf, Dense(view.index, g)) for view, g in zip(views, grads, strict=True)]


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs.get(name)


def _region(view: ParamView, transpose: bool) -> Tensor | None:
    if not transpose:
        return view.index
    index = view.index
    if index is None:
        index = torch.arange(view.tensor.numel()).view(view.tensor.shape)
    return index.T


def _tokens(x: Tensor, batch: int) -> Tensor:
    """``[B, ..., d]`` -> ``[B, T, d]``."""
    return x.reshape(batch, -1, x.shape[-1])


def _linear_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    args, kwargs = use.arguments()
    x = _argument(args, kwargs, 0, "input")
    weight = _argument(args, kwargs, 1, "weight")
    bias = _argument(args, kwargs, 2, "bias")
    if not (isinstance(x, DataRef) and isinstance(weight, ParamView)):
        return None
    if bias is not None and not isinstance(bias, ParamView):
        return None
    (cotangent,) = cotangents
    K, B = cotangent.shape[:2]
    A = _tokens(records[x.record], B)
    D = cotangent.reshape(K, B, -1, cotangent.shape[-1])
    out: list[Contribution] = [(weight.leaf, Linear(weight.index, A, D))]
    if bias is not None:
        out.append((bias.leaf, Dense(bias.index, D.sum(dim=2))))
    return out


def _matmul_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    args, kwargs = use.arguments()
    left = _argument(args, kwargs, 0, "input")
    right = _argument(args, kwargs, 1, "other")
    (cotangent,) = cotangents
    K, B = cotangent.shape[:2]
    if isinstance(left, DataRef) and isinstance(right, ParamView) and right.tensor.dim() == 2:
        x = records[left.record]
        if x.dim() < 2:  # a per-sample scalar cannot be a matmul operand
            return None
        A = _tokens(x, B)
        D = cotangent.reshape(K, B, -1, right.tensor.shape[1])
        return [(right.leaf, Linear(_region(right, transpose=True), A, D))]
    if isinstance(left, ParamView) and isinstance(right, DataRef) and left.tensor.dim() == 2:
        x = records[right.record]
        if x.dim() == 2:  # W @ v with a vector per sample
            A, D = x.unsqueeze(1), cotangent.reshape(K, B, 1, -1)
        else:
            A = _tokens(x.transpose(-1, -2), B)
            D = cotangent.transpose(-1, -2).reshape(K, B, -1, left.tensor.shape[0])
        return [(left.leaf, Linear(left.index, A, D))]
    return None


Rule = Callable[[Use, Sequence[Tensor], Sequence[Tensor]], list[Contribution] | None]
_RULES: dict[str, Rule] = {
    "linear": _linear_rule,
    "matmul": _matmul_rule,
    "__matmul__": _matmul_rule,
    "mm": _matmul_rule,
}
