"""gramian composes with torch.func.vmap, torch.func.grad, plain autograd and no_grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import differentiable_gramian, flat_gramian
from torch import nn
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

import torchgram


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def _losses(model):
    def fn(params, x, y):
        return (functional_call(model, params, (x,)).squeeze(-1) - y) ** 2

    return fn


def _data():
    return torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)


def test_vmap_over_ensemble_equals_loop() -> None:
    members = [_model() for _ in range(3)]
    for i, m in enumerate(members):
        for p in m.parameters():
            p.data.add_(0.1 * i)
    stacked, _ = stack_module_state(members)
    base = _model().to("meta")
    fn = _losses(base)
    x, y = _data()
    G = vmap(torchgram.gramian_of(fn, batch_dim=0), in_dims=(0, None, None))(stacked, x, y)
    assert G.shape == (3, 6, 6)
    for i, member in enumerate(members):
        params = {k: v.detach() for k, v in member.named_parameters()}
        expected = flat_gramian(_losses(member), params, x, y)
        assert torch.allclose(G[i], expected, rtol=1e-10, atol=1e-12)


def _trace_oracle(fn, params, x, y):
    return flat_gramian(fn, params, x, y).trace()


def test_func_grad_of_trace_equals_oracle() -> None:
    model = _model()
    fn = _losses(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _data()
    ours = grad(lambda p: torchgram.gramian(fn, p, x, y, batch_dim=0).trace())(params)
    expected = grad(lambda p: _trace_oracle(fn, p, x, y))(params)
    for name in params:
        assert torch.allclose(ours[name], expected[name], rtol=1e-9, atol=1e-12)


def test_func_jvp_of_trace_equals_oracle() -> None:
    """Forward-mode through the Gramian: the pull-back must keep what the tangents flow through."""
    model = _model()
    fn = _losses(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    x, y = _data()
    _, ours = jvp(
        lambda p: torchgram.gramian(fn, p, x, y, batch_dim=0).trace(), (params,), (tangents,)
    )
    _, expected = jvp(lambda p: _trace_oracle(fn, p, x, y), (params,), (tangents,))
    assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_autograd_through_a_tensor_fn_closes_over() -> None:
    """The Gramian depends on a tensor that is no argument of fn: its gradient must still flow."""
    params = {"w": torch.randn(4, 3, dtype=torch.float64)}
    x, _ = _data()

    def losses(scale):
        return lambda params, x: (torch.tanh(x @ params["w"]) * scale).pow(2).sum(-1)

    scale = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    torchgram.gramian(losses(scale), params, x, batch_dim=0).trace().backward()
    expected = grad(lambda s: flat_gramian(losses(s), params, x).trace())(scale.detach())
    assert scale.grad is not None
    assert torch.allclose(scale.grad, expected, rtol=1e-9, atol=1e-12)


def test_func_grad_of_off_diagonal_sum_equals_oracle() -> None:
    model = _model()
    fn = _losses(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _data()
    ours = grad(lambda p: torchgram.gramian(fn, p, x, y, batch_dim=0).sum())(params)
    expected = grad(lambda p: flat_gramian(fn, p, x, y).sum())(params)
    for name in params:
        assert torch.allclose(ours[name], expected[name], rtol=1e-9, atol=1e-12)


def test_plain_autograd_of_trace_equals_oracle() -> None:
    model = _model()
    fn = _losses(model)
    params = dict(model.named_parameters())  # leaves that require grad
    x, y = _data()
    torchgram.gramian(fn, params, x, y, batch_dim=0).trace().backward()
    expected = grad(lambda p: _trace_oracle(fn, p, x, y))(
        {k: v.detach() for k, v in params.items()}
    )
    for name, p in params.items():
        assert torch.allclose(p.grad, expected[name], rtol=1e-9, atol=1e-12)


_NORMS = {
    "layer_norm": lambda h, p: F.layer_norm(h, (6,), p["scale"], p["shift"]),
    "layer_norm_derived": lambda h, p: F.layer_norm(h, (6,), p["scale"].exp()) + p["shift"],
    "group_norm": lambda h, p: F.group_norm(h, 2, p["scale"], p["shift"]),
    "rms_norm": lambda h, p: F.rms_norm(h, (6,), p["scale"]) + p["shift"],
}


@pytest.mark.parametrize("norm", sorted(_NORMS))
@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("how", ["autograd", "func.grad"])
@pytest.mark.parametrize("outputs", [1, 2])
def test_gradient_of_the_gramian_through_norms(norm, batch_dim, how, outputs) -> None:
    """Gradients of G where a linear layer feeds a norm whose affine parameters are tapped on
    the parameters. The oracle is autograd row by row: jacrev's own double backward through
    layer_norm's weight is wrong in torch 2.13, and so was torchgram's vmap over the output rows
    of a pull-back inside torch.func (batch_dim=None, layer_norm); with plain autograd,
    group_norm's batched pull-back that builds a graph raised a size mismatch."""
    torch.manual_seed(0)
    D = torch.float64
    params = {
        "w": torch.randn(6, 6, dtype=D),
        "scale": torch.randn(6, dtype=D),
        "shift": torch.randn(6, dtype=D),
        "v": torch.randn(6, outputs, dtype=D),
    }
    x = torch.randn(4, 6, dtype=D)

    def fn(p, x):
        out = _NORMS[norm](torch.tanh(F.linear(x, p["w"])), p) @ p["v"]
        return out.squeeze(-1) if outputs == 1 else out

    def loss(G):
        return torchgram.flatten(G).pow(2).sum()

    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    expected = torch.autograd.grad(
        loss(differentiable_gramian(fn, leaves, x)), list(leaves.values())
    )
    if how == "autograd":
        G = torchgram.gramian(fn, leaves, x, batch_dim=batch_dim)
        ours = torch.autograd.grad(loss(G), list(leaves.values()))
    else:
        found = grad(lambda p: loss(torchgram.gramian(fn, p, x, batch_dim=batch_dim)))(params)
        ours = tuple(found.values())
    for name, a, b in zip(params, ours, expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), name


def _normed(p, x):  # [B, 2]
    return _NORMS["layer_norm"](torch.tanh(F.linear(x, p["w"])), p) @ p["v"]


def _norm_params() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    D = torch.float64
    return {
        "w": torch.randn(6, 6, dtype=D),
        "scale": torch.randn(6, dtype=D),
        "shift": torch.randn(6, dtype=D),
        "v": torch.randn(6, 2, dtype=D),
    }


@pytest.mark.parametrize("batch_dim", [0, None])
def test_jvp_of_the_gramian_through_a_norm(batch_dim) -> None:
    """Forward mode through G (no tensor requires grad there) pulls the rows back one at a time
    too: vmap's double backward of layer_norm's weight was 7.9e-2 off with batch_dim=None."""
    params = _norm_params()
    x = torch.randn(4, 6, dtype=torch.float64)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    oracle = differentiable_gramian(_normed, leaves, x).pow(2).sum()
    expected = sum(
        (g * tangents[k]).sum()
        for k, g in zip(params, torch.autograd.grad(oracle, list(leaves.values())), strict=True)
    )

    def loss(p):
        return torchgram.flatten(torchgram.gramian(_normed, p, x, batch_dim=batch_dim)).pow(2).sum()

    _, found = jvp(loss, (params,), (tangents,))
    assert torch.allclose(found, expected, rtol=1e-9)


def test_batched_run_gradient_of_the_gramian_through_attention_and_layer_norm() -> None:
    """The batched run (fn calls attention) taps layer_norm on its output, and its rule gives the
    weight's per-sample gradients in closed form: through the generic rule (vmap of the op's vjp)
    the gradients of G were 27% off. The oracle's attention is written out (jacrev-free)."""
    params = _norm_params()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    fused = [True]

    def attend(h):
        if fused[0]:
            return F.scaled_dot_product_attention(h, h, h)
        return torch.softmax(h @ h.transpose(-1, -2) / 6**0.5, -1) @ h

    def fn(p, x):  # [B, T]
        h = torch.tanh(F.linear(x, p["w"]))
        return F.layer_norm(attend(h) + h, (6,), p["scale"], p["shift"]) @ p["v"][:, 0]

    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    fused[0] = False
    expected = torch.autograd.grad(
        differentiable_gramian(fn, leaves, x).pow(2).sum(), list(leaves.values())
    )
    fused[0] = True
    transform = torchgram.gramian_of(fn, batch_dim=0)
    for _ in range(2):  # the second call takes the batched run alone
        G = torchgram.flatten(transform(leaves, x))
        found = torch.autograd.grad(G.pow(2).sum(), list(leaves.values()))
        for name, a, b in zip(params, found, expected, strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), name


@pytest.mark.parametrize("batch_dim", [0, None])
def test_plain_autograd_through_gramians_of_an_ensemble(batch_dim) -> None:
    """An outer vmap over stacked parameters that require grad, then plain autograd through the
    Gramians: under vmap the output's wrapper says it needs no grad, so the Gramian used to lose
    its graph (gradients 110% off, some None)."""
    torch.manual_seed(0)
    D = torch.float64
    members = [{"w": torch.randn(6, 6, dtype=D), "v": torch.randn(6, 2, dtype=D)} for _ in range(2)]
    x = torch.randn(4, 6, dtype=D)

    def fn(p, x):
        return torch.tanh(F.linear(x, p["w"])) @ p["v"]

    stacked = {k: torch.stack([m[k] for m in members]).requires_grad_() for k in members[0]}
    G = vmap(lambda p: torchgram.flatten(torchgram.gramian(fn, p, x, batch_dim=batch_dim)))(stacked)
    found = torch.autograd.grad(G.pow(2).sum(), list(stacked.values()))
    for i, member in enumerate(members):
        leaves = {k: v.clone().requires_grad_() for k, v in member.items()}
        oracle = differentiable_gramian(fn, leaves, x)
        assert torch.allclose(G[i], oracle.detach(), rtol=1e-10)
        expected = torch.autograd.grad(oracle.pow(2).sum(), list(leaves.values()))
        for name, a, b in zip(member, found, expected, strict=True):
            assert torch.allclose(a[i], b, rtol=1e-9, atol=1e-9), name


def test_inside_no_grad_and_with_inputs_requiring_grad() -> None:
    model = _model()
    fn = _losses(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _data()
    expected = flat_gramian(fn, params, x, y)
    with torch.no_grad():
        G = torchgram.gramian(fn, params, x, y, batch_dim=0)
    assert torch.allclose(G, expected, rtol=1e-10)
    x = x.clone().requires_grad_()
    G = torchgram.gramian(fn, params, x, y, batch_dim=0)
    assert torch.allclose(G, expected, rtol=1e-10)
    (gx,) = torch.autograd.grad(G.trace(), x)
    expected_gx = grad(lambda x: _trace_oracle(fn, params, x, y))(x.detach())
    assert torch.allclose(gx, expected_gx, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel", ["chosen", "patches", "grouped", "rows"])
def test_vmap_over_ensemble_with_chunked_rules(monkeypatch, kernel) -> None:
    # tiny chunks force the blockwise paths of the ghost and conv rules under an outer vmap
    from torchgram._ops.conv_factor import Conv

    if kernel != "chosen":
        monkeypatch.setattr(Conv, "kernel_for_gradients", lambda self, chunk_bytes: kernel)
        monkeypatch.setattr(Conv, "form", lambda self: "materialised")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(20, 1))
    members = [model.double()] + [
        nn.Sequential(
            nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(20, 1)
        ).double()
        for _ in range(2)
    ]
    stacked, _ = stack_module_state(members)
    x = torch.randn(6, 3, 5, dtype=torch.float64)

    def fn(params, x):
        return functional_call(model, params, (x,)).squeeze(-1)

    transform = torchgram.gramian_of(fn, batch_dim=0, max_chunk_bytes=256)
    G = vmap(transform, in_dims=(0, None))(stacked, x)
    for i, member in enumerate(members):
        params = {k: v.detach() for k, v in member.named_parameters()}
        assert torch.allclose(G[i], flat_gramian(fn, params, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", ["chosen", "patches", "grouped", "rows"])
def test_func_grad_of_trace_through_convolutions_equals_oracle(monkeypatch, kernel) -> None:
    """Through every kernel of the materialised conv form (and the choice the shapes make)."""
    from torchgram._ops.conv_factor import Conv

    if kernel != "chosen":
        monkeypatch.setattr(Conv, "kernel_for_gradients", lambda self, chunk_bytes: kernel)
        monkeypatch.setattr(Conv, "form", lambda self: "materialised")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, groups=1),
        nn.Flatten(), nn.Linear(4, 1),
    ).double()  # fmt: skip
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)

    def fn(params, x):
        return functional_call(model, params, (x,)).squeeze(-1)

    ours = grad(lambda p: torchgram.gramian(fn, p, x, batch_dim=0).trace())(params)
    expected = grad(lambda p: flat_gramian(fn, p, x).trace())(params)
    for name in params:
        assert torch.allclose(ours[name], expected[name], rtol=1e-9, atol=1e-12)
