"""Norms: everything torchgram does with them.

- Taps: ``layer_norm``, ``group_norm`` and ``rms_norm`` are tapped on their affine parameters
  where fn runs per sample (``TAPPED_ON_PARAMS``); their cotangents are the per-sample gradients.
- Guards: ``batch_norm`` in training mode mixes samples, and with running statistics updates
  them inside its kernel; ``instance_norm`` with running statistics too. Both are refused where
  they cannot be followed, and the statistics are saved to be put back after a failed call.
- Rules: ``layer_norm`` tapped on its output (the batched run) and ``batch_norm`` in eval mode,
their affine parameters' per-sample gradients in closed form, ``sum c * x_hat`` and ``sum c``;
and ``instance_norm`` with running statistics, replayed without them.

Under ``vmap`` layer_norm is tapped on its parameters and needs no rule. Where it is tapped on its
output, the generic rule would give the same gradients through ``vmap`` of the op's vjp with
respect to the weight, whose derivatives torch 2.13 gets wrong (the Gramian's gradients were
2-27% off); the closed form is plain differentiable ops, and cheaper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

from torchgram._factors import Dense
from torchgram._ops.common import Contribution, Rule, argument, data_and_params
from torchgram._ops.generic import generic_factors
from torchgram._uses import DataRef, ParamView, Use

Tensor = torch.Tensor

# Norms tapped on their affine parameters (small next to the output) where fn runs per sample.
TAPPED_ON_PARAMS = frozenset({"layer_norm", "group_norm", "rms_norm"})

# Norms whose affine weight torch 2.13's vmap gets wrong in a pull-back that is differentiated
# again (vmap over the rows of the vjp with respect to the weight): where the Gramian is
# differentiated under torch.func, the rows are pulled back one at a time (torchgram._run).
WEIGHTED_NORMS = frozenset(
    {
        "layer_norm", "native_layer_norm", "batch_norm", "native_batch_norm", "instance_norm",
        "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    }
)  # fmt: skip


class CrossSampleOpError(ValueError):
    """fn called an op that mixes the samples of a batch while ``batch_dim`` was set."""


def captured_write_error(caller: str, detail: str) -> ValueError:
    """The error for fn writing into a tensor it did not create (``detail``: what did)."""
    return ValueError(
        f"{caller}: fn changes in place a tensor it did not create ({detail}). "
        "torch.func transforms, which the Gramian is computed with, refuse that. The usual "
        "cause is BatchNorm in training mode updating its running statistics: call "
        "model.eval() to use them, or torch.func.replace_all_batch_norm_modules_(model) "
        "(or track_running_stats=False) to normalise with batch statistics without "
        "updating any (then with batch_dim=None, as batch statistics mix samples)."
    )


def instance_norm_statistics(
    func: Callable[..., Any], args: Sequence[Any], kwargs: dict, caller: str, per_sample: bool
) -> list[tuple[Tensor, Tensor]]:
    """The running statistics this instance_norm call updates, each with its value before the
    call (to be put back if the call fails). With them and the input's own statistics the kernel
    updates them with a mean over the batch: refused with ``batch_dim`` (vmap cannot follow the
    write, and a run per sample would make one update per sample), before it runs."""
    functional = func is torch.nn.functional.instance_norm
    names = ("running_mean", "running_var", "use_input_stats")
    positions = (1, 2, 5) if functional else (3, 4, 5)
    mean, var, own = (
        kwargs.get(n, args[p] if len(args) > p else None)
        for n, p in zip(names, positions, strict=True)
    )
    updates = (own is None or bool(own)) and (isinstance(mean, Tensor) or isinstance(var, Tensor))
    if updates and per_sample:
        raise CrossSampleOpError(
            f"{caller}: fn calls instance_norm with running statistics in training "
            "mode, which updates them with a mean over the batch inside the kernel, so "
            "batch_dim cannot separate the samples of that update. Call model.eval() to "
            "use the running statistics without updating them, build the norm with "
            "track_running_stats=False, or pass batch_dim=None (exact, and the statistics "
            "are updated once per call)."
        )
    if not updates:
        return []
    return [(t, t.detach().clone()) for t in (mean, var) if isinstance(t, Tensor)]


def check_batch_norm(
    func: Callable[..., Any], args: Sequence[Any], kwargs: dict, caller: str, per_sample: bool
) -> None:
    """Refuse batch_norm in training mode where it mixes samples (``batch_dim``) or updates
    running statistics inside its kernel, where neither the tape nor torch.func sees the write."""
    training = kwargs.get("training", args[5] if len(args) > 5 else False)
    if not training:
        return
    if per_sample:
        raise CrossSampleOpError(
            f"{caller}: fn calls batch_norm in training mode, which normalises each "
            "sample with statistics of the whole batch, so a sample's output depends on "
            "the other samples and batch_dim's promise does not hold. Call model.eval() "
            "to use running statistics, replace BatchNorm with GroupNorm or LayerNorm, or "
            "pass batch_dim=None (exact with batch statistics)."
        )
    # torch.nn.functional.batch_norm(input, running_mean, running_var, ...) and
    # torch.batch_norm(input, weight, bias, running_mean, running_var, ...) update the running
    # statistics inside the kernel, where neither the tape nor torch.func sees the write
    positions = (1, 2) if func is torch.nn.functional.batch_norm else (3, 4)
    names = ("running_mean", "running_var")
    stats = [
        kwargs.get(n, args[p] if len(args) > p else None)
        for n, p in zip(names, positions, strict=True)
    ]
    if any(isinstance(s, Tensor) for s in stats):
        raise captured_write_error(
            caller, "batch_norm in training mode updates its running statistics"
        )


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
