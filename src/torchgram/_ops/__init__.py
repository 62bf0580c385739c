"""Op families: one module per family owns everything torchgram does with its ops: how the tape
treats them, what the guards check, and the rule that turns a recorded use, its inputs and its
output cotangents into gradient factors.

Each rule returns ``(leaf, factor)`` pairs, one per parameter argument of the use, or None when the
use does not have the shape it knows (e.g. ``linear`` whose input is itself a parameter); then the
generic rule, exact for every op, takes over. The families:

- ``.linear``: ``linear``, ``addmm``, ``matmul``/``mm``/``@``, ``einsum``;
- ``.conv`` (its factor in ``.conv_factor``): ``conv1d``/``conv2d``/``conv3d``;
- ``.embedding``: ``embedding``, rule and factor;
- ``.norm``: layer, group, RMS, batch and instance norms: taps, guards and rules;
- ``.elementwise``: scales, shifts and biases (tapped on their parameters, no rule);
- ``.attention``: scaled-dot-product attention's kernel choice (no parameter of its own);
- ``.recurrent``: LSTM, GRU and RNN, run as linear maps and gates;
- ``.random``: dropout and sampling, noted for the sample check;
- ``.registered``: rules that users register for their own ops (``torchgram.rules``), which
  take precedence over the built-in ones;
- ``.generic``: everything else (the per-op per-sample vjp).

Uses whose taps went on their parameter arguments (``Use.on_params``: norms' affine parameters,
broadcast scales, shifts and biases) need no rule: their cotangents are the per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchgram._factors import Dense
from torchgram._ops import conv, embedding, linear, norm
from torchgram._ops.common import Contribution, Rule
from torchgram._ops.generic import generic_factors
from torchgram._ops.registered import rule_for, to_contributions
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
    uses tapped on their parameters are named ``"parameters"``, a registered rule by its
    function's name):
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
    registered = rule_for(use.func)
    if registered is not None:
        found = to_contributions(registered, use, records, cotangents)
        if found is not None:
            return found, getattr(registered, "__name__", "registered")
    rule = RULES.get(use.name)
    if rule is not None:
        found = rule(use, records, cotangents)
        if found is not None:
            return found, use.name
    return generic_factors(use, records, cotangents), "generic"
