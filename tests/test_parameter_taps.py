"""Uses tapped on their parameters: norms' affine parameters and elementwise ops with a parameter.

Their taps go on the parameter arguments, so the pull-back gives the per-sample gradients directly
(``Use.on_params``); checked against the oracle and against the generic rule.
"""

from __future__ import annotations

import pytest
import torch
from rule_check import check_exact, rule_counts
from torch import nn
from torch.func import functional_call

import torchgram


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
def test_norm_matches_oracle(monkeypatch, module, shape, op, batch_dim) -> None:
    torch.manual_seed(0)
    fn, params = _module_fn(module)
    x = torch.randn(*shape, dtype=torch.float64)
    check_exact(monkeypatch, fn, params, x, batch_dim=batch_dim)
    assert rule_counts(fn, params, x) == {(op, "parameters"): 1}


OPS = {  # the tape records the builtin each operator dispatches to (mul, add, sub, rsub, div)
    "mul": (lambda x, w: x * w),
    "rmul": (lambda x, w: w * x),
    "torch.mul": (lambda x, w: torch.mul(x, w)),
    "add": (lambda x, w: x + w),
    "radd": (lambda x, w: 2.0 + w + x),
    "add-alpha": (lambda x, w: torch.add(x, w, alpha=-3.0)),
    "sub": (lambda x, w: x - w),
    "rsub": (lambda x, w: 1.5 - w + x),
    "sub-first": (lambda x, w: w - x),
    "div": (lambda x, w: w / (x.abs() + 1)),
    "scale": (lambda x, w: x @ (w * 0.5).expand(4, 4)),
}


# "scale" expands its parameter to [4, 4], so it only takes the [4] shape
CASES = [
    (name, shape)
    for name in sorted(OPS)
    for shape in [(4,), (1, 4), (2, 1)]
    if name != "scale" or shape == (4,)
]


@pytest.mark.parametrize(("name", "shape"), CASES)
@pytest.mark.parametrize("batch_dim", [0, None])
def test_elementwise_matches_oracle(monkeypatch, name, shape, batch_dim) -> None:
    op = OPS[name]
    torch.manual_seed(0)
    params = {"w": torch.randn(*shape, dtype=torch.float64)}
    x = torch.randn(3, 2, 4, dtype=torch.float64)

    def fn(params, x):
        return torch.tanh(op(x, params["w"])).pow(2).sum((-1, -2))

    check_exact(monkeypatch, fn, params, x, batch_dim=batch_dim)
    counts = rule_counts(fn, params, x)
    assert all(rule == "parameters" for _, rule in counts), counts


def test_two_parameter_operands(monkeypatch) -> None:
    params = {"a": torch.randn(4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    x = torch.randn(3, 4, dtype=torch.float64)

    def fn(params, x):
        return (x * (params["a"] * params["b"])).sum(-1)

    check_exact(monkeypatch, fn, params, x)
    assert rule_counts(fn, params, x) == {("mul", "parameters"): 1}  # one use, two taps


def test_a_parameter_used_twice_in_one_op_and_in_a_matmul(monkeypatch) -> None:
    """Each slot gets its own tap; cross terms with the matmul's use of the same leaf are exact."""
    params = {"w": torch.randn(4, dtype=torch.float64)}
    x = torch.randn(3, 4, dtype=torch.float64)

    def fn(params, x):
        w = params["w"]
        return torch.tanh(x * (w * w)).sum(-1) + (x @ w) ** 2

    check_exact(monkeypatch, fn, params, x)


def test_parameter_taps_hold_per_sample_gradients_not_output_cotangents() -> None:
    """The cotangents a group norm leaves are [K, B, C] per parameter, not [K, B, C, H, W]."""
    from torchgram._pytree import split_inputs
    from torchgram._run import Options, linearise

    norm = nn.GroupNorm(2, 4).double()
    params = {k: v.detach() for k, v in norm.named_parameters()}
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)

    def fn(params, x):
        return functional_call(norm, params, (x,)).pow(2).sum((1, 2, 3))

    inputs = split_inputs((params, x), (0,), 0, "test")
    run = linearise(fn, inputs, Options(0, False, False, "test"))
    assert [tuple(c.shape) for c in run.cotangents] == [(1, 3, 4), (1, 3, 4)]
    assert torchgram.flatten(run.gramian()).shape == (3, 3)
