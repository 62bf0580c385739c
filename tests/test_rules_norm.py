"""Affine parameters of layer_norm, group_norm and rms_norm, from records and cotangents."""

from __future__ import annotations

import pytest
import torch
from rule_check import check_exact, rule_counts
from torch import nn
from torch.func import functional_call


def _module_fn(module: nn.Module):
    module = module.double()
    params = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in module.named_parameters()}

    def fn(params, x):
        return torch.tanh(functional_call(module, params, (x,))).pow(2).flatten(1).sum(-1)

    return fn, params


@pytest.mark.parametrize(
    ("module", "shape", "op"),
    [
        (nn.LayerNorm(5), (3, 4, 5), "layer_norm"),
        (nn.LayerNorm((4, 5)), (3, 4, 5), "layer_norm"),
        (nn.LayerNorm(5, bias=False), (3, 5), "layer_norm"),
        (nn.GroupNorm(2, 4), (3, 4, 6), "group_norm"),
        (nn.GroupNorm(2, 4), (3, 4, 3, 3), "group_norm"),
        (nn.GroupNorm(4, 4), (3, 4, 2, 2, 2), "group_norm"),
        (nn.RMSNorm(5), (3, 4, 5), "rms_norm"),
        (nn.RMSNorm((4, 5), eps=1e-3), (3, 4, 5), "rms_norm"),
    ],
)
@pytest.mark.parametrize("batch_dim", [0, None])
def test_norm_matches_oracle_and_generic(monkeypatch, module, shape, op, batch_dim) -> None:
    torch.manual_seed(0)
    fn, params = _module_fn(module)
    x = torch.randn(*shape, dtype=torch.float64)
    check_exact(monkeypatch, fn, params, x, batch_dim=batch_dim)
    assert rule_counts(fn, params, x) == {(op, op): 1}
