"""Per-use rules: a recorded use, its inputs and its output cotangents -> gradient factors.

Each rule returns ``(leaf, factor)`` pairs, one per parameter argument of the use, or None when the
use does not have the shape it knows (e.g. ``linear`` whose input is itself a parameter); then the
generic rule, exact for every op, takes over. One module per family of ops:

- ``.linear``: ``linear``, ``matmul``/``mm``/``@``, ``einsum``;
- ``.conv``: ``conv1d``/``conv2d``/``conv3d``;
- ``.embedding``: ``embedding``;
- ``.norm``: ``layer_norm`` tapped on its output (the batched run);
- ``.generic``: everything else (the per-op per-sample vjp).

Uses whose taps went on their parameter arguments (``Use.on_params``: norms' affine parameters,
broadcast scales, shifts and biases) need no rule: their cotangents are the per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchgram._factors import Dense
from torchgram._rules import conv, embedding, linear, norm
from torchgram._rules.common import Contribution, Rule
from torchgram._rules.generic import generic_factors
from torchgram._uses import Use

Tensor = torch.Tensor

RULES: dict[str, Rule] = {
    **linear.RULES,
    **conv.RULES,
    **embedding.RULES,
    **norm.RULES,
}

__all__ = ["RULES", "generic_factors", "rule_names", "use_factors"]


def use_factors(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution]:
    """The gradient factors of every parameter argument of ``use``.

    Args:
        use: The recorded use.
        records: All recorded data tensors, each ``[B, ...]`` (per-sample shape after B).
        cotangents: The cotangents of this use's tapped outputs, each ``[K, B, *out_shape]``.
    """
    return _factors_and_rule(use, records, cotangents)[0]


def rule_names(
    uses: Sequence[Use], records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[tuple[str, str]]:
    """``(op name, rule)`` for every use, the rule being the op's name or ``"generic"``.

    A debugging aid (and what the tests use to check that common layers take a fast rule;
    uses tapped on their parameters are named ``"parameters"``):
    ``cotangents`` are all the tapped outputs' cotangents, as in ``Linearised``.
    """
    names = []
    for use in uses:
        mine = cotangents[use.first_tap : use.first_tap + len(use.tapped)]
        names.append((use.name, _factors_and_rule(use, records, mine)[1]))
    return names


def _factors_and_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> tuple[list[Contribution], str]:
    if use.on_params:
        views = [use.leaves[slot] for slot in use.params]
        factors: list[Contribution] = [
            (view.leaf, Dense(view.index, g)) for view, g in zip(views, cotangents, strict=True)
        ]
        return factors, "parameters"
    rule = RULES.get(use.name)
    if rule is not None:
        found = rule(use, records, cotangents)
        if found is not None:
            return found, use.name
    return generic_factors(use, records, cotangents), "generic"
