"""Affine parameters of ``layer_norm``, ``group_norm`` and ``rms_norm``.

Their per-sample gradients are small (one number per channel) and closed-form: the weight's is the
cotangent times the normalised input, summed over the positions sharing a channel, the bias's the
summed cotangent. The normalised input is recomputed from the recorded input with the same op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from torchgram._factors import Dense
from torchgram._rules.common import Contribution, Rule, argument, data_and_params
from torchgram._tape import ParamView, Use

Tensor = torch.Tensor


def _affine(
    weight: object, bias: object, normalised: Tensor, D: Tensor, channel_dims: int
) -> list[Contribution] | None:
    """Dense factors of ``weight`` and ``bias`` from ``D`` ``[K, B, *S]``.

    ``channel_dims``: how many trailing dims of ``S`` the parameters have (after moving the
    channels of a group norm last).
    """
    out: list[Contribution] = []
    reduce = tuple(range(2, D.dim() - channel_dims))
    if isinstance(weight, ParamView):
        g = (D * normalised.unsqueeze(0)).sum(dim=reduce) if reduce else D * normalised
        out.append(
            (weight.leaf, Dense(weight.index, g.reshape(*D.shape[:2], *weight.tensor.shape)))
        )
    if isinstance(bias, ParamView):
        g = D.sum(dim=reduce) if reduce else D
        out.append((bias.leaf, Dense(bias.index, g.reshape(*D.shape[:2], *bias.tensor.shape))))
    return out


def layer_norm_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``layer_norm(x, normalized_shape, weight, bias, eps)``."""
    args, kwargs = use.arguments()
    x, shape = argument(args, kwargs, 0, "input"), argument(args, kwargs, 1, "normalized_shape")
    weight, bias = argument(args, kwargs, 2, "weight"), argument(args, kwargs, 3, "bias")
    eps = argument(args, kwargs, 4, "eps")
    if not data_and_params(x, weight, bias):
        return None
    normalised = F.layer_norm(records[x.record], shape, None, None, 1e-5 if eps is None else eps)
    (cotangent,) = cotangents
    return _affine(weight, bias, normalised, cotangent, len(shape))


def rms_norm_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``rms_norm(x, normalized_shape, weight, eps)``."""
    args, kwargs = use.arguments()
    x, shape = argument(args, kwargs, 0, "input"), argument(args, kwargs, 1, "normalized_shape")
    weight, eps = argument(args, kwargs, 2, "weight"), argument(args, kwargs, 3, "eps")
    if not data_and_params(x, weight):
        return None
    normalised = F.rms_norm(records[x.record], shape, None, eps)
    (cotangent,) = cotangents
    return _affine(weight, None, normalised, cotangent, len(shape))


def group_norm_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``group_norm(x, num_groups, weight, bias, eps)`` on ``[N, C, *spatial]`` per sample."""
    args, kwargs = use.arguments()
    x, groups = argument(args, kwargs, 0, "input"), argument(args, kwargs, 1, "num_groups")
    weight, bias = argument(args, kwargs, 2, "weight"), argument(args, kwargs, 3, "bias")
    eps = argument(args, kwargs, 4, "eps")
    if not data_and_params(x, weight, bias):
        return None
    data = records[x.record]
    if data.dim() < 3:  # group_norm needs [N, C, ...] per sample
        return None
    # [B, N, C, *spatial] as one batch of images: group norm treats images independently
    normalised = F.group_norm(data.flatten(0, 1), groups, None, None, 1e-5 if eps is None else eps)
    normalised = normalised.view(data.shape).movedim(2, -1)
    (cotangent,) = cotangents
    return _affine(weight, bias, normalised, cotangent.movedim(3, -1), 1)


RULES: dict[str, Rule] = {
    "layer_norm": layer_norm_rule,
    "group_norm": group_norm_rule,
    "rms_norm": rms_norm_rule,
}
