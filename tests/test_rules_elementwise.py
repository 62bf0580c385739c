"""mul/add/sub/div with a broadcast parameter: per-sample gradients from records directly."""

from __future__ import annotations

import pytest
import torch
from rule_check import check_exact, rule_counts

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
def test_elementwise_matches_oracle_and_generic(monkeypatch, name, shape, batch_dim) -> None:
    op = OPS[name]
    torch.manual_seed(0)
    params = {"w": torch.randn(*shape, dtype=torch.float64)}
    x = torch.randn(3, 2, 4, dtype=torch.float64)

    def fn(params, x):
        return torch.tanh(op(x, params["w"])).pow(2).sum((-1, -2))

    check_exact(monkeypatch, fn, params, x, batch_dim=batch_dim)
    counts = rule_counts(fn, params, x)
    assert all(rule != "generic" for _, rule in counts)


def test_two_parameter_operands_fall_back_to_generic(monkeypatch) -> None:
    params = {"a": torch.randn(4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    x = torch.randn(3, 4, dtype=torch.float64)

    def fn(params, x):
        return (x * (params["a"] * params["b"])).sum(-1)

    check_exact(monkeypatch, fn, params, x)
    assert rule_counts(fn, params, x) == {("mul", "generic"): 1}
