"""Linear maps with a parameter operand: ``linear``, ``matmul``/``mm``/``@``, ``addmm`` and
``einsum``.

``linear`` and matmul give ``torchgram._factors.Linear`` factors (ghost or materialised
Gramian); views of a parameter (chunks of a packed projection, transposes) only change the
factor's region. ``einsum`` gives the per-sample gradients directly, by one batched ``einsum``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchgram._factors import Dense, Factor, Linear, TokenSum, use_ghost
from torchgram._ops.common import (
    Contribution,
    Rule,
    argument,
    data_and_params,
    tokens,
    transposed_region,
)
from torchgram._uses import DataRef, ParamView, Use

Tensor = torch.Tensor


def linear_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``linear(x, W, b)``: a Linear factor for W, the summed cotangents for b."""
    args, kwargs = use.arguments()
    x = argument(args, kwargs, 0, "input")
    weight = argument(args, kwargs, 1, "weight")
    bias = argument(args, kwargs, 2, "bias")
    if not (isinstance(weight, ParamView) and data_and_params(x, bias)):
        return None
    if weight.tensor.dim() != 2:  # a 1-D weight (x @ w, no output dim): the generic rule
        return None
    (cotangent,) = cotangents
    K, B = cotangent.shape[:2]
    D = cotangent.reshape(K, B, -1, cotangent.shape[-1])
    whole = weight.index is None and bias is not None and bias.index is None
    A = tokens(records[x.record], B)
    out: list[Contribution] = [
        (weight.leaf, Linear(weight.index, A, D, bias.leaf if whole else None))
    ]
    if bias is not None:
        out.append((bias.leaf, _bias_factor(bias, D, whole and use_ghost(A.shape, D.shape))))
    return out


def _bias_factor(bias: ParamView, D: Tensor, may_join: bool) -> Factor:
    """The bias's per-sample gradients, ``D`` summed over tokens: a view for one token; the sum
    put off where the bias may join its weight's ghost Gramian (then it is never needed); else
    the sum now, which lets ``D`` go with the weight's factor (``gramian(release=True)``)."""
    if D.shape[2] == 1:
        return Dense(bias.index, D[:, :, 0])
    return TokenSum(bias.index, D) if may_join else Dense(bias.index, D.sum(dim=2))


def matmul_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``x @ W`` or ``W @ x`` with a 2-D parameter ``W``: a Linear factor (on ``W.T`` for x @ W)."""
    args, kwargs = use.arguments()
    left = argument(args, kwargs, 0, "input")
    right = argument(args, kwargs, 1, "other")
    (cotangent,) = cotangents
    K, B = cotangent.shape[:2]
    if isinstance(left, DataRef) and isinstance(right, ParamView) and right.tensor.dim() == 2:
        x = records[left.record]
        if x.dim() < 2:  # a per-sample scalar cannot be a matmul operand
            return None
        D = cotangent.reshape(K, B, -1, right.tensor.shape[1])
        return [(right.leaf, Linear(transposed_region(right), tokens(x, B), D))]
    if isinstance(left, ParamView) and isinstance(right, DataRef) and left.tensor.dim() == 2:
        x = records[right.record]
        if x.dim() == 2:  # W @ v with a vector per sample
            A, D = x.unsqueeze(1), cotangent.reshape(K, B, 1, -1)
        else:
            A = tokens(x.transpose(-1, -2), B)
            D = cotangent.transpose(-1, -2).reshape(K, B, -1, left.tensor.shape[0])
        return [(left.leaf, Linear(left.index, A, D))]
    return None


def addmm_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``addmm(b, x, W, beta=1, alpha=1)`` (``beta * b + alpha * x @ W``, transformers' GPT-2
    ``Conv1D``) with a 2-D parameter ``W`` and data ``x``: a Linear factor on ``W.T``, and the
    summed cotangents for a parameter ``b``."""
    args, kwargs = use.arguments()
    bias = argument(args, kwargs, 0, "input")
    x = argument(args, kwargs, 1, "mat1")
    weight = argument(args, kwargs, 2, "mat2")
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    usable = isinstance(weight, ParamView) and isinstance(x, DataRef)
    if not usable or not isinstance(bias, (ParamView, DataRef)):
        return None
    (cotangent,) = cotangents
    K, B = cotangent.shape[:2]
    D = cotangent.reshape(K, B, -1, weight.tensor.shape[1])
    out: list[Contribution] = [
        (weight.leaf, Linear(transposed_region(weight), tokens(records[x.record], B), alpha * D))
    ]
    if isinstance(bias, ParamView) and bias.tensor.dim() == 1:
        out.append((bias.leaf, _bias_factor(bias, beta * D, False)))
    elif isinstance(bias, ParamView):
        return None  # a bias of another shape than the output's rows: the generic rule
    return out


def einsum_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``einsum`` with one parameter operand: its per-sample gradients by one batched einsum.

    The gradient of an operand of an einsum is the einsum of the other operands and the output
    cotangent onto the operand's subscripts; sample and row letters are added to batch it.
    Equations with ``...``, repeated subscripts in an operand, or subscripts of the parameter
    found nowhere else (a broadcast sum) are left to the generic rule.
    """
    args, kwargs = use.arguments()
    if kwargs or not args or not isinstance(args[0], str):
        return None
    operands = list(args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
    equation = args[0].replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    inputs, output = equation.split("->")
    subscripts = inputs.split(",")
    params = [i for i, op in enumerate(operands) if isinstance(op, ParamView)]
    if len(params) != 1 or len(subscripts) != len(operands):
        return None
    if not all(isinstance(op, (ParamView, DataRef)) for op in operands):
        return None
    p = params[0]
    others = [i for i in range(len(operands)) if i != p]
    if any(len(set(s)) != len(s) for s in subscripts):
        return None
    if not set(subscripts[p]) <= set(output).union(*(subscripts[i] for i in others)):
        return None
    free = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    row, sample = free[0], free[1]
    terms = [sample + subscripts[i] for i in others] + [row + sample + output]
    batched = ",".join(terms) + "->" + row + sample + subscripts[p]
    (cotangent,) = cotangents
    data = [records[operands[i].record] for i in others]
    if any(x.dim() - 1 != len(subscripts[i]) for x, i in zip(data, others, strict=True)):
        return None
    g = torch.einsum(batched, *data, cotangent)
    view: ParamView = operands[p]
    return [(view.leaf, Dense(view.index, g))]


RULES: dict[str, Rule] = {
    "linear": linear_rule,
    "matmul": matmul_rule,
    "__matmul__": matmul_rule,
    "mm": matmul_rule,
    "addmm": addmm_rule,
    "einsum": einsum_rule,
}
