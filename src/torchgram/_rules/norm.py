"""Norms: ``layer_norm`` tapped on its output (the batched run) and ``batch_norm`` in eval mode,
their affine parameters' per-sample gradients in closed form, ``sum c * x_hat`` and ``sum c``;
and ``instance_norm`` with running statistics, replayed without them.

Under ``vmap`` layer_norm is tapped on its parameters and needs no rule. Where it is tapped on its
output, the generic rule would give the same gradients through ``vmap`` of the op's vjp with
respect to the weight, whose derivatives torch 2.13 gets wrong (the Gramian's gradients were
2-27% off); the closed form is plain differentiable ops, and cheaper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import optree
import torch

from torchgram._factors import Dense
from torchgram._rules.common import Contribution, Rule, argument, data_and_params
from torchgram._rules.generic import generic_factors
from torchgram._uses import DataRef, ParamView, Use

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


def batch_norm_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``batch_norm`` with running statistics (eval mode): a per-channel affine map of the
    input, normalised by statistics that are data, so the per-sample gradients of its weight and
    bias are ``sum c * x_hat`` and ``sum c`` over each sample's other dimensions."""
    args, kwargs = use.arguments()
    functional = use.func is torch.nn.functional.batch_norm
    names = ("weight", "bias", "running_mean", "running_var", "training", "eps")
    positions = (3, 4, 1, 2, 5, 7) if functional else (1, 2, 3, 4, 5, 7)
    weight, bias, mean, var, training, eps = (
        argument(args, kwargs, p, n) for p, n in zip(positions, names, strict=True)
    )
    x = argument(args, kwargs, 0, "input")
    stats = isinstance(mean, DataRef) and isinstance(var, DataRef)
    if training or not stats or not data_and_params(x, weight, bias):
        return None
    (cotangent,) = cotangents  # [K, B, *x], channels at dimension 1 of x
    if cotangent.dim() < 4:
        return None
    channels = 3  # K, B, the sample's leading dimension, then the channels
    reduced = tuple(d for d in range(2, cotangent.dim()) if d != channels)
    out: list[Contribution] = []
    if weight is not None:
        shape = (-1, *([1] * (cotangent.dim() - channels - 1)))
        scale = torch.rsqrt(records[var.record][0] + (1e-5 if eps is None else eps)).reshape(shape)
        normalised = (records[x.record] - records[mean.record][0].reshape(shape)) * scale
        out.append((weight.leaf, Dense(weight.index, (cotangent * normalised).sum(reduced))))
    if bias is not None:
        out.append((bias.leaf, Dense(bias.index, cotangent.sum(reduced))))
    return out


def instance_norm_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``instance_norm`` normalising with the input's own statistics, and running statistics
    given: the generic rule on the op without them. They do not change its output, but the
    kernel would update them again on every replay of the op."""
    args, kwargs = use.arguments()
    functional = use.func is torch.nn.functional.instance_norm
    stats = (1, 2) if functional else (3, 4)
    own = argument(args, kwargs, 5, "use_input_stats")
    names = ("running_mean", "running_var")
    given = [argument(args, kwargs, p, n) for p, n in zip(stats, names, strict=True)]
    if (own is not None and not own) or all(g is None for g in given):
        return None  # the generic rule on the op as it is
    args = tuple(None if i in stats else a for i, a in enumerate(args))
    kwargs = {k: None if k in names else v for k, v in kwargs.items()}
    leaves, spec = optree.tree_flatten((args, kwargs), none_is_leaf=True)  # type: ignore[arg-type,var-annotated]
    quiet = dataclasses.replace(
        use,
        spec=spec,
        leaves=leaves,
        data=[i for i, v in enumerate(leaves) if isinstance(v, DataRef)],
        params=[i for i, v in enumerate(leaves) if isinstance(v, ParamView)],
    )
    return generic_factors(quiet, records, cotangents)


RULES: dict[str, Rule] = {
    "layer_norm": layer_norm_rule,
    "batch_norm": batch_norm_rule,
    "instance_norm": instance_norm_rule,
}
