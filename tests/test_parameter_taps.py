"""Uses tapped on their parameters: norms' affine parameters and elementwise ops with a parameter.

Their taps go on the parameter arguments, so the pull-back gives the per-sample gradients directly
(``Use.on_params``); checked against the oracle and against the generic rule, which these uses only
take once ``PARAMETER_TAPPED`` is emptied (their taps then go on their outputs): ``_check_tapped``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rule_check import _close, check_exact, rule_counts
from torch import nn
from torch.func import functional_call

import torchgram
import torchgram._ops as rules
import torchgram._tape as tape


def _check_tapped(monkeypatch, fn, params, x, batch_dim=0) -> None:
    """``check_exact``, and the Gramian equals the one with no op tapped on its parameters: with
    ``PARAMETER_TAPPED`` and the rules emptied, every use takes the generic rule on its outputs'
    cotangents (``check_exact``'s own generic comparison leaves parameter-tapped uses as they are).
    """
    check_exact(monkeypatch, fn, params, x, batch_dim=batch_dim)
    tapped = torchgram.gramian(fn, params, x, batch_dim=batch_dim)
    with monkeypatch.context() as patch:
        patch.setattr(tape, "PARAMETER_TAPPED", frozenset())
        patch.setattr(rules, "RULES", {})
        counts = rule_counts(fn, params, x, batch_dim=batch_dim)
        generic = torchgram.gramian(fn, params, x, batch_dim=batch_dim)
    assert counts and all(rule == "generic" for _, rule in counts), counts
    assert _close(tapped, generic)


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
    _check_tapped(monkeypatch, fn, params, x, batch_dim=batch_dim)
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
    "div-by": (lambda x, w: x / w),
    "torch.div-by": (lambda x, w: torch.div(x, w)),
    "rdiv": (lambda x, w: 2.0 / w + x),
    "rdiv-tensor": (lambda x, w: torch.linspace(1.0, 2.0, 4, dtype=torch.float64) / w + x),
    "sub-alpha": (lambda x, w: torch.sub(w, x, alpha=0.5)),
    "sub-alpha-second": (lambda x, w: torch.sub(x, w, alpha=0.5)),
    "add-alpha-2": (lambda x, w: torch.add(x, w, alpha=2)),
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

    _check_tapped(monkeypatch, fn, params, x, batch_dim=batch_dim)
    counts = rule_counts(fn, params, x)
    assert all(rule == "parameters" for _, rule in counts), counts


def test_two_parameter_operands(monkeypatch) -> None:
    params = {"a": torch.randn(4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    x = torch.randn(3, 4, dtype=torch.float64)

    def fn(params, x):
        return (x * (params["a"] * params["b"])).sum(-1)

    _check_tapped(monkeypatch, fn, params, x)
    assert rule_counts(fn, params, x) == {("mul", "parameters"): 1}  # one use, two taps


def test_a_parameter_used_twice_in_one_op_and_in_a_matmul(monkeypatch) -> None:
    """Each slot gets its own tap; cross terms with the matmul's use of the same leaf are exact."""
    params = {"w": torch.randn(4, dtype=torch.float64)}
    x = torch.randn(3, 4, dtype=torch.float64)

    def fn(params, x):
        w = params["w"]
        return torch.tanh(x * (w * w)).sum(-1) + (x @ w) ** 2

    _check_tapped(monkeypatch, fn, params, x)


def test_parameter_taps_hold_per_sample_gradients_not_output_cotangents() -> None:
    """The cotangents a group norm leaves are [K, B, C] per parameter, not [K, B, C, H, W]."""
    from torchgram._linearised import Options
    from torchgram._pytree import split_inputs
    from torchgram._run import linearise

    norm = nn.GroupNorm(2, 4).double()
    params = {k: v.detach() for k, v in norm.named_parameters()}
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)

    def fn(params, x):
        return functional_call(norm, params, (x,)).pow(2).sum((1, 2, 3))

    inputs = split_inputs((params, x), (0,), 0, "test")
    run = linearise(fn, inputs, Options(0, False, False, "test"))
    assert [tuple(c.shape) for c in run.cotangents] == [(1, 3, 4), (1, 3, 4)]
    assert torchgram.flatten(run.gramian()).shape == (3, 3)


VIEW_OPS = {  # (parameter shape, x shape, op): a tapped op on a view of the parameter leaf
    "mul-slice": ((5,), (3, 2, 3), lambda x, w: x * w[:3]),
    "add-transpose": ((4, 3), (3, 2, 3, 4), lambda x, w: x + w.t()),
    "div-strided": ((4, 2), (3, 4), lambda x, w: x / w[:, 1]),
    "sub-reshape": ((6,), (3, 2, 3), lambda x, w: torch.sub(x, w.reshape(2, 3), alpha=2)),
    "overlapping": ((5,), (3, 2, 3), lambda x, w: x * w[:3] + torch.tanh(x + w[2:])),
    "view-and-leaf": ((4,), (3, 2, 4), lambda x, w: x * w + x / w[[1, 0, 3, 2]] + w.flip(0)),
    "layer_norm-rows": (
        (2, 5),
        (3, 4, 5),
        lambda x, w: F.layer_norm(x, (5,), weight=w[0], bias=w[1]),
    ),
    "group_norm-columns": (
        (4, 2),
        (3, 4, 6),
        lambda x, w: F.group_norm(x, 2, weight=w[:, 0], bias=w[:, 1]),
    ),
}


@pytest.mark.parametrize("name", sorted(VIEW_OPS))
@pytest.mark.parametrize("batch_dim", [0, None])
def test_tapped_op_on_a_view_of_a_parameter(monkeypatch, name, batch_dim) -> None:
    w_shape, x_shape, op = VIEW_OPS[name]
    params = {"w": torch.randn(*w_shape, dtype=torch.float64)}
    x = torch.randn(*x_shape, dtype=torch.float64)

    def fn(params, x):
        return torch.tanh(op(x, params["w"])).pow(2).flatten(1).sum(-1)

    _check_tapped(monkeypatch, fn, params, x, batch_dim=batch_dim)
    assert "parameters" in {rule for _, rule in rule_counts(fn, params, x)}, name
