"""Elementwise ``mul``/``add``/``sub``/``div`` with a broadcast parameter (scales, shifts, biases).

For ``out = x * w`` (or ``x + w``, ``x - w``, ``w / x``, with ``x`` data or a number) the
per-sample gradient of ``w`` is the cotangent times ``x`` (or ``±1``, ``1 / x``) summed over the
dimensions ``w`` is broadcast along: small, so it is materialised directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number
from typing import Any

import torch

from torchgram._factors import Dense
from torchgram._rules.common import Contribution, Rule, per_sample, sum_to_shape
from torchgram._tape import DataRef, ParamView, Use

Tensor = torch.Tensor

# name -> (kind, whether the operands are swapped: ``w.__rsub__(x)`` is ``x - w``)
_OPS: dict[str, tuple[str, bool]] = {
    "mul": ("mul", False), "__mul__": ("mul", False), "__rmul__": ("mul", False),
    "multiply": ("mul", False),
    "add": ("add", False), "__add__": ("add", False), "__radd__": ("add", False),
    "sub": ("sub", False), "__sub__": ("sub", False), "subtract": ("sub", False),
    "__rsub__": ("sub", True), "rsub": ("sub", True),
    "div": ("div", False), "__truediv__": ("div", False), "true_divide": ("div", False),
    "divide": ("div", False),
}  # fmt: skip


def _coefficient(kind: str, first: bool, other: Any, records: Sequence[Tensor], alpha: Any):
    """d out / d w elementwise (a number or a ``[B, *S]`` record), or None if not handled.

    ``first``: whether the parameter is the first operand of the (unswapped) op.
    """
    value: Tensor | float
    if isinstance(other, DataRef):
        value = records[other.record]
    elif isinstance(other, Number) and not isinstance(other, bool):
        value = float(other)  # type: ignore[arg-type]
    else:
        return None
    scale = 1.0 if alpha is None else float(alpha)
    if kind == "mul":
        return value
    if kind == "add":
        return 1.0 if first else scale
    if kind == "sub":
        return 1.0 if first else -scale
    if kind == "div" and first:
        return 1.0 / value
    return None


def elementwise_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """One parameter operand, the other data or a number; ``out=`` and rounding modes excluded."""
    kind, swapped = _OPS[use.name]
    args, kwargs = use.arguments()
    alpha = kwargs.get("alpha")
    if len(args) != 2 or set(kwargs) - {"alpha"}:
        return None
    left, right = (args[1], args[0]) if swapped else (args[0], args[1])
    if isinstance(left, ParamView) and not isinstance(right, ParamView):
        view, other, first = left, right, True
    elif isinstance(right, ParamView) and not isinstance(left, ParamView):
        view, other, first = right, left, False
    else:
        return None
    coefficient = _coefficient(kind, first, other, records, alpha)
    if coefficient is None:
        return None
    (cotangent,) = cotangents
    if isinstance(coefficient, Tensor):
        coefficient = per_sample(coefficient, cotangent.dim() - 2).unsqueeze(0)
    g = (
        cotangent * coefficient
        if not isinstance(coefficient, float) or coefficient != 1
        else cotangent
    )
    return [(view.leaf, Dense(view.index, sum_to_shape(g, view.tensor.shape)))]


RULES: dict[str, Rule] = dict.fromkeys(_OPS, elementwise_rule)
