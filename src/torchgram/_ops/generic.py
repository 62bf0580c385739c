"""The generic rule: exact for any op, the per-sample vjp of this one op under ``vmap``."""

from __future__ import annotations

from collections.abc import Sequence

import optree
import torch
from torch.func import vjp, vmap

from torchgram._factors import Dense
from torchgram._internals import FUNCTION_WITHOUT_SETUP_CONTEXT
from torchgram._ops.common import Contribution
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
    try:
        grads = vmap(per_sample, in_dims=(None, 0), randomness="same")(data, list(cotangents))
    except RuntimeError as error:
        if FUNCTION_WITHOUT_SETUP_CONTEXT in str(error):
            raise NoGenericRule(use.name) from None
        raise
    return [(view.leaf, Dense(view.index, g)) for view, g in zip(views, grads, strict=True)]


class NoGenericRule(Exception):
    """The generic rule cannot run an op: its autograd formula is one torch.func cannot
    differentiate (a ``torch.library`` custom op's, an ``autograd.Function`` without
    ``setup_context``)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def error(self, caller: str) -> ValueError:
        return ValueError(
            f"{caller}: fn calls {self.name} on a parameter, and its autograd formula (a "
            "torch.library custom op's, or an autograd.Function without setup_context) is one "
            "torch.func cannot run, so torchgram's generic rule, the op's vjp under vmap, cannot "
            "give its per-sample gradients. Register a Gramian rule for the op with "
            "torchgram.rules.register (see the docs' Rules page), or write the op with torch "
            "functions torchgram can see."
        )
