"""vjp_and_gramian and jd_grad: weighted gradients from the tape, without running fn again."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from oracle import jacobian_matrix
from zoo import cases

import torchgram

CASES = cases()


def _flat(tree) -> torch.Tensor:
    import optree

    return torch.cat([t.reshape(-1) for t in optree.tree_leaves(tree)])


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch_dim", [0, None])
def test_vjp_fn_matches_oracle(name: str, batch_dim) -> None:
    case = CASES[name]
    out, vjp_fn, G = torchgram.vjp_and_gramian(
        case.fn, case.params, *case.args, batch_dim=batch_dim
    )
    weights = torch.randn_like(out)
    direction = vjp_fn(weights)
    assert set(direction) == set(case.params)
    J = jacobian_matrix(case.fn, case.params, *case.args)
    expected = weights.reshape(-1) @ J
    assert torch.allclose(_flat(direction), expected, rtol=1e-9, atol=1e-10)
    assert torch.allclose(torchgram.flatten(G), J @ J.T, rtol=1e-9, atol=1e-10)


def test_vjp_fn_with_generalized_output_and_batch_dim_1() -> None:
    params = {"w": torch.randn(4, 3, dtype=torch.float64)}
    x = torch.randn(5, 4, dtype=torch.float64)

    def fn(params, x):
        return torch.tanh(x @ params["w"]).T  # [3, B]

    out, vjp_fn, G = torchgram.vjp_and_gramian(fn, params, x, batch_dim=1)
    weights = torch.randn(3, 5, dtype=torch.float64)
    J = jacobian_matrix(fn, params, x)
    assert torch.allclose(vjp_fn(weights)["w"].reshape(-1), weights.reshape(-1) @ J)


def test_vjp_fn_does_not_run_fn_again() -> None:
    calls = []
    params = {"w": torch.randn(4, 3, dtype=torch.float64)}

    def fn(params, x):
        calls.append(1)
        return (x @ params["w"]).pow(2).sum(-1)

    out, vjp_fn, G = torchgram.vjp_and_gramian(fn, params, torch.randn(5, 4).double(), batch_dim=0)
    before = len(calls)
    vjp_fn(torch.ones(5, dtype=torch.float64))
    vjp_fn(torch.randn(5, dtype=torch.float64))
    assert len(calls) == before


def test_vjp_fn_rejects_weights_of_the_wrong_shape() -> None:
    params = {"w": torch.randn(4, 3)}
    out, vjp_fn, _ = torchgram.vjp_and_gramian(
        lambda p, x: (x @ p["w"]).sum(-1), params, torch.randn(5, 4), batch_dim=0
    )
    with pytest.raises(ValueError, match=r"shaped like fn's output \[5\], got \[4\]"):
        vjp_fn(torch.ones(4))


def test_jd_grad_with_sum_weighting_is_the_gradient_of_the_sum() -> None:
    case = CASES["transformer"]
    step = torchgram.jd_grad(case.fn, torchgram.weightings.sum, batch_dim=0)
    direction = step(case.params, *case.args)
    expected = torch.func.grad(lambda p: case.fn(p, *case.args).sum())(case.params)
    for name in expected:
        assert torch.allclose(direction[name], expected[name], rtol=1e-9, atol=1e-12)


def test_jd_grad_with_upgrad_is_non_conflicting() -> None:
    case = CASES["mlp"]
    step = torchgram.jd_grad(case.fn, functools.partial(torchgram.weightings.upgrad), batch_dim=0)
    direction = _flat(step(case.params, *case.args))
    J = jacobian_matrix(case.fn, case.params, *case.args)
    G = J @ J.T
    weights = torchgram.weightings.upgrad(G)
    assert torch.allclose(J.T @ weights, direction, rtol=1e-6, atol=1e-9)
    # non-conflicting up to upgrad's documented slack: G w >= -reg_eps * trace(G) * w
    slack = 1e-4 * G.trace() * weights
    assert (J @ direction >= -slack - 1e-10).all()


def test_jd_grad_has_aux_and_argnums() -> None:
    params = {"w": torch.randn(4, 3, dtype=torch.float64)}
    x = torch.randn(5, 4, dtype=torch.float64)

    def fn(x, params):
        losses = (x @ params["w"]).pow(2).sum(-1)
        return losses, losses.detach()

    direction, losses = torchgram.jd_grad(
        fn, torchgram.weightings.mean, argnums=1, batch_dim=0, has_aux=True
    )(x, params)
    assert losses.shape == (5,)
    expected = torch.func.grad(lambda p: fn(x, p)[0].mean())(params)
    assert torch.allclose(direction["w"], expected["w"])


def test_vjp_keeps_the_parameters_dtype_under_autocast() -> None:
    """A rule's weighted gradient in autocast's dtype is promoted to the parameter's."""
    torch.manual_seed(0)
    p, x = {"w": torch.randn(5, 4), "b": torch.randn(5)}, torch.randn(3, 4)

    def fn(p: Any, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, p["w"], p["b"]).pow(2).sum(-1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, vjp_fn, _ = torchgram.vjp_and_gramian(fn, p, x, batch_dim=0)
        grads = vjp_fn(torch.ones(3, dtype=out.dtype))
    assert {k: g.dtype for k, g in grads.items()} == {"w": torch.float32, "b": torch.float32}
