"""Rules that users register for their own ops (``torchgram.rules``): exact against the oracle,
taken where registered, checked where wrong in shape, gone once unregistered."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import flat_gramian, row_by_row_gramian
from rule_check import check_exact, rule_counts

import torchgram
from torchgram.rules import Call, LinearGradients, PerSampleGradients

calls: list[Call] = []


@pytest.fixture(autouse=True)
def _clean():
    calls.clear()
    yield
    for op in list(torchgram.rules.registered()):
        torchgram.rules.unregister(op)


def bilinear_rule(call: Call):
    calls.append(call)
    x1, x2, weight, bias = call.args[:4]
    if call.kwargs:
        return None
    A = torch.einsum("bti,btj->btij", call.tokens(x1), call.tokens(x2)).flatten(2)
    D = call.cotangent.reshape(call.rows, call.batch, -1, weight.shape[0])
    return [LinearGradients(A, D)] + ([PerSampleGradients(D.sum(2))] if bias is not None else [])


def _bilinear_case(bias: bool = True):
    torch.manual_seed(0)
    layer = torch.nn.Bilinear(3, 4, 2, bias=bias).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def fn(params, x1, x2):
        out = torch.func.functional_call(layer, params, (x1, x2))
        return torch.tanh(out).pow(2).sum((-1, -2))

    x1 = torch.randn(5, 7, 3, dtype=torch.float64)
    x2 = torch.randn(5, 7, 4, dtype=torch.float64)
    return fn, params, x1, x2


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_dim", [0, None])
def test_registered_rule_is_taken_and_exact(monkeypatch, bias, batch_dim) -> None:
    fn, params, x1, x2 = _bilinear_case(bias)
    assert ("bilinear", "generic") in rule_counts(fn, params, x1, x2, batch_dim=batch_dim)
    torchgram.rules.register(torch.bilinear, bilinear_rule)
    counts = rule_counts(fn, params, x1, x2, batch_dim=batch_dim)
    assert counts == {("bilinear", "bilinear_rule"): 1}
    check_exact(monkeypatch, fn, params, x1, x2, batch_dim=batch_dim)
    assert calls and calls[-1].op is torch.bilinear
    assert [p.shape for p in calls[-1].params] == [v.shape for v in params.values()]


def test_rule_declining_leaves_the_generic_rule() -> None:
    torchgram.rules.register(torch.bilinear, lambda call: None)
    fn, params, x1, x2 = _bilinear_case()
    assert ("bilinear", "generic") in rule_counts(fn, params, x1, x2)
    G = torchgram.gramian(fn, params, x1, x2)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, params, x1, x2), rtol=1e-10)


def test_decorator_form_and_unregister() -> None:
    @torchgram.rules.register(torch.bilinear)
    def rule(call: Call):
        return bilinear_rule(call)

    assert torchgram.rules.registered() == {torch.bilinear: rule}
    fn, params, x1, x2 = _bilinear_case()
    assert rule_counts(fn, params, x1, x2) == {("bilinear", "rule"): 1}
    assert torchgram.rules.unregister(torch.bilinear) is rule
    assert torchgram.rules.unregister(torch.bilinear) is None
    assert ("bilinear", "generic") in rule_counts(fn, params, x1, x2)


@torch.library.custom_op("torchgram_test::linear_tanh", mutates_args=())
def linear_tanh(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A fused op of the user's: ``tanh(x @ weight.T)``."""
    return torch.tanh(x @ weight.T)


@linear_tanh.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output)


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    pre = grad * (1 - out.pow(2))
    return pre @ weight, pre.reshape(-1, pre.shape[-1]).T @ x.reshape(-1, x.shape[-1])


linear_tanh.register_autograd(_backward, setup_context=_setup)


def linear_tanh_rule(call: Call):
    """The weight is used linearly before the tanh: ``D = cotangent * tanh'``."""
    calls.append(call)
    x, weight = call.args
    x = call.tokens(x)  # [B, T, i]
    out = torch.tanh(x @ weight.T)  # [B, T, o]
    D = call.cotangent.reshape(call.rows, call.batch, -1, weight.shape[0])
    return [LinearGradients(x, D * (1 - out.pow(2)))]


@pytest.mark.parametrize(
    "op", [linear_tanh, torch.ops.torchgram_test.linear_tanh, "torchgram_test::linear_tanh"]
)
def test_custom_op_rule(op) -> None:
    """A torch.library op: found however it was registered (the op object, its packet or its
    qualified name), exact, and without the generic rule's loop over the samples."""
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 4, dtype=torch.float64)}
    x = torch.randn(6, 5, 4, dtype=torch.float64)

    def fn(params, x):
        return linear_tanh(x, params["w"]).pow(2).sum((-1, -2))

    torchgram.rules.register(op, linear_tanh_rule)
    assert [rule for _, rule in rule_counts(fn, params, x)] == ["linear_tanh_rule"]
    for _ in range(2):  # the first call, then a remembered one
        out, vjp_fn, G = torchgram.vjp_and_gramian(fn, params, x)
        # the oracle without torch.func, which the op's autograd formula does not support
        assert torch.allclose(G, row_by_row_gramian(fn, params, x), rtol=1e-10)
        weights = torch.randn_like(out)
        w = params["w"].clone().requires_grad_()
        (expected,) = torch.autograd.grad(fn({"w": w}, x), w, weights)
        assert torch.allclose(vjp_fn(weights)["w"], expected, rtol=1e-10)


def test_rule_on_a_python_function_records_it_whole(monkeypatch) -> None:
    """F.embedding hands its arguments to the active modes (the tape steps inside to
    torch.embedding); with a rule registered for it, its calls are recorded whole."""
    torch.manual_seed(0)
    params = {"table": torch.randn(10, 3, dtype=torch.float64)}
    tokens = torch.randint(0, 10, (4, 6))

    def rule(call: Call):
        calls.append(call)
        ids, table = call.args[:2]
        K, B = call.rows, call.batch
        ids = ids.reshape(B, -1)  # [B, T]
        cotangent = call.cotangent.reshape(K, B, -1, table.shape[1])  # [K, B, T, d]
        g = cotangent.new_zeros(K, B, *table.shape)
        for i in range(B):
            g[:, i] = g[:, i].index_add(1, ids[i].reshape(-1), cotangent[:, i])
        return [PerSampleGradients(g)]

    def fn(params, tokens):
        return torch.sin(F.embedding(tokens, params["table"])).sum((-1, -2))

    torchgram.rules.register(F.embedding, rule)
    assert rule_counts(fn, params, tokens) == {("embedding", "rule"): 1}
    check_exact(monkeypatch, fn, params, tokens)


def _D(call: Call) -> torch.Tensor:
    return call.cotangent.reshape(call.rows, call.batch, -1, call.cotangent.shape[-1])


def _wrong(result):
    def rule(call: Call):
        return result(call)

    return rule


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        (
            lambda call: [LinearGradients(call.tokens(call.args[0])[..., :2], _D(call))],
            ValueError,
            "d_out \\* d_in must equal",
        ),
        (lambda call: [], ValueError, "returned list of length 0; a rule returns one"),
        (
            lambda call: LinearGradients(call.tokens(call.args[0]), _D(call)),
            ValueError,
            "returned LinearGradients",
        ),
        (lambda call: [call.cotangent], TypeError, "returned Tensor for a parameter argument"),
        (
            lambda call: [PerSampleGradients(call.cotangent)],
            ValueError,
            "expected \\[K, B, \\*shape\\]",
        ),
        (
            lambda call: [LinearGradients(call.tokens(call.args[0]), _D(call)[0])],
            ValueError,
            "expected A \\[B, T, d_in\\] and D",
        ),
    ],
)
def test_wrong_rule_results_are_refused(result, error, match) -> None:
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 4, dtype=torch.float64)}
    x = torch.randn(6, 5, 4, dtype=torch.float64)

    def fn(params, x):
        return linear_tanh(x, params["w"]).pow(2).sum((-1, -2))

    torchgram.rules.register(linear_tanh, _wrong(result))
    with pytest.raises(error, match=f"rule .*registered for linear_tanh.*{match}|{match}"):
        torchgram.gramian(fn, params, x)


def test_register_refuses_what_is_not_callable() -> None:
    with pytest.raises(TypeError, match="register\\(op, rule\\): rule must be a function"):
        torchgram.rules.register(torch.bilinear, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="register\\(op\\): op must be the function"):
        torchgram.rules.register(3, bilinear_rule)


def test_registered_rule_under_vmap_over_an_ensemble() -> None:
    fn, params, x1, x2 = _bilinear_case()
    torchgram.rules.register(torch.bilinear, bilinear_rule)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    G = torch.func.vmap(lambda p: torchgram.gramian(fn, p, x1, x2))(stacked)
    for i in range(2):
        member = {k: v[i] for k, v in stacked.items()}
        assert torch.allclose(G[i], flat_gramian(fn, member, x1, x2), rtol=1e-10)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_custom_op_without_rule_is_refused_with_the_fix(batch_dim) -> None:
    """The generic rule differentiates the op under torch.func, which a torch.library op's
    autograd formula does not support: a clear error naming the op and the registry."""
    params = {"w": torch.randn(3, 4, dtype=torch.float64)}
    x = torch.randn(6, 5, 4, dtype=torch.float64)

    def fn(params, x):
        return linear_tanh(x, params["w"]).pow(2).sum((-1, -2))

    with pytest.raises(
        ValueError,
        match=rf"gramian\(fn, batch_dim={batch_dim}\): fn calls linear_tanh.*rules.register",
    ):
        torchgram.gramian(fn, params, x, batch_dim=batch_dim)
