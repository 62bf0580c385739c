"""Convolutions ``conv1d``/``conv2d``/``conv3d``: the linear rule on unfolded patches, per group.

Zero padding given to the op (numbers, ``'same'``, ``'valid'``) goes to the factor, whose kernels
pad as the op did (uneven ``'same'`` padding is applied to the recorded input here); other padding
modes reach the op already padded (``F.pad`` runs before it). So every stride, dilation and group
count is one ``torchgram._ops.conv_factor.Conv`` factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from torchgram._factors import Dense
from torchgram._ops.common import Contribution, Rule, argument, data_and_params
from torchgram._ops.conv_factor import Conv
from torchgram._uses import ParamView, Use

Tensor = torch.Tensor


def _per_dim(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    return values * n if len(values) == 1 else values


def _padding(
    value: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding per spatial dimension for a conv's ``padding`` argument."""
    n = len(kernel)
    if value == "valid":
        return [(0, 0)] * n
    if value == "same":  # as torch does it: the odd element of the total goes on the right
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in _per_dim(value, n)]


def conv_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``convNd(x, W, b, stride, padding, dilation, groups)`` with data ``x`` and parameter W."""
    args, kwargs = use.arguments()
    x_ref = argument(args, kwargs, 0, "input")
    weight = argument(args, kwargs, 1, "weight")
    bias = argument(args, kwargs, 2, "bias")
    if not (isinstance(weight, ParamView) and data_and_params(x_ref, bias)):
        return None
    n = weight.tensor.dim() - 2
    kernel = tuple(weight.tensor.shape[2:])
    stride = _per_dim(argument(args, kwargs, 3, "stride") or 1, n)
    dilation = _per_dim(argument(args, kwargs, 5, "dilation") or 1, n)
    padding = _padding(argument(args, kwargs, 4, "padding") or 0, kernel, dilation)
    groups = int(argument(args, kwargs, 6, "groups") or 1)
    (cotangent,) = cotangents
    B = cotangent.shape[1]
    x = records[x_ref.record]
    if x.dim() == n + 2:  # one unbatched image per sample: a batch of one
        x, cotangent = x.unsqueeze(1), cotangent.unsqueeze(2)
    if any(before != after for before, after in padding):  # the kernel pads both sides alike
        amounts = [amount for pair in reversed(padding) for amount in pair]
        x = F.pad(x.flatten(0, 1), amounts).unflatten(0, (B, -1))
        padding = [(0, 0)] * n
    symmetric = tuple(before for before, _ in padding)
    factor = Conv(weight.index, x, cotangent, kernel, stride, symmetric, dilation, groups)
    out: list[Contribution] = [(weight.leaf, factor)]
    if bias is not None:
        summed = cotangent.sum(dim=(2, *range(4, cotangent.dim())))
        out.append((bias.leaf, Dense(bias.index, summed)))
    return out


RULES: dict[str, Rule] = {"conv1d": conv_rule, "conv2d": conv_rule, "conv3d": conv_rule}
