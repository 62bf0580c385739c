"""The generic rule: exact for any op, the per-sample vjp of this one op under ``vmap``."""

from __future__ import annotations

from collections.abc import Sequence

import optree
import torch
from torch.func import vjp, vmap

from torchgram._factors import Dense
from torchgram._rules.common import Contribution
from torchgram._uses import ParamView, Use

Tensor = torch.Tensor


def generic_factors(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution]:
    """Per-sample gradients of every parameter argument, ``[K, B, *view]`` each (Dense)."""
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
