"""``layer_norm`` tapped on its output (the batched run): its affine parameters' per-sample
gradients in closed form, ``sum c * x_hat`` and ``sum c``.

Under ``vmap`` layer_norm is tapped on its parameters and needs no rule. Where it is tapped on its
output, the generic rule would give the same gradients through ``vmap`` of the op's vjp with
respect to the weight, whose derivatives torch 2.13 gets wrong (the Gramian's gradients were
2-27% off); the closed form is plain differentiable ops, and cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchgram._factors import Dense
from torchgram._rules.common import Contribution, Rule, argument, data_and_params
from torchgram._tape import Use

Tensor = torch.Tensor


def layer_norm_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``layer_norm(x, normalized_shape, weight, bias, eps)``, weight and bias parameter views or
    None."""
    args, kwargs = use.arguments()
    x = argument(args, kwargs, 0, "input")
    shape = argument(args, kwargs, 1, "normalized_shape")
    weight = argument(args, kwargs, 2, "weight")
    bias = argument(args, kwargs, 3, "bias")
    eps = argument(args, kwargs, 4, "eps")
    if not data_and_params(x, weight, bias):
        return None
    dims = len(shape) if isinstance(shape, (list, tuple)) else 1  # torch.Size is a tuple
    (cotangent,) = cotangents  # [K, B, *x]
    reduced = tuple(range(2, cotangent.dim() - dims))  # the leading dims of a sample

    def per_sample(t: Tensor) -> Tensor:  # sum over them (sum(()) would sum everything)
        return t.sum(reduced) if reduced else t

    out: list[Contribution] = []
    if weight is not None:
        record = records[x.record]
        dtype = torch.promote_types(record.dtype, torch.float32)  # as the kernel computes
        h = record.to(dtype)
        axes = tuple(range(h.dim() - dims, h.dim()))
        mean = h.mean(axes, keepdim=True)
        variance = (h - mean).pow(2).mean(axes, keepdim=True)
        normalised = (h - mean) * torch.rsqrt(variance + (1e-5 if eps is None else eps))
        g = per_sample(cotangent.to(dtype) * normalised).to(cotangent.dtype)
        out.append((weight.leaf, Dense(weight.index, g)))
    if bias is not None:
        out.append((bias.leaf, Dense(bias.index, per_sample(cotangent))))
    return out


RULES: dict[str, Rule] = {"layer_norm": layer_norm_rule}
