"""Without ``batch_dim``, later calls may run fn without the tape and pull the rows back to the
parameters themselves (``torchgram._whole.linearise_to_params``): exact, and chosen where it
pays (``gradients_pay``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from conftest import count_calls
from oracle import flat_gramian, jacobian_matrix
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo import cases

import torchgram
from torchgram import _run

D = torch.float64


@pytest.fixture
def to_params(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry per run pulled back to the parameters."""
    return count_calls(monkeypatch, _run, "linearise_to_params")


@pytest.fixture
def always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every first call chooses the pull-back to the parameters, whatever it costs."""
    monkeypatch.setattr(_run, "gradients_pay", lambda run: True)


def _assert_oracle(G: torch.Tensor, fn: Callable[..., Any], *args: Any) -> None:
    expected = flat_gramian(fn, *args)
    assert torch.allclose(G.reshape(expected.shape), expected, rtol=1e-10, atol=1e-12)


def _three_losses(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn's per-sample losses folded into three losses over the batch (multi-task style)."""

    def losses(params: Any, *args: Any) -> torch.Tensor:
        out = fn(params, *args)
        return torch.stack([out.sum(), out.pow(2).mean(), out[0] - out[-1]])

    return losses


@pytest.mark.parametrize("name", list(cases()))
def test_every_zoo_model_is_exact(name: str, always: None, to_params: list[None]) -> None:
    case = cases()[name]
    fn = _three_losses(case.fn)
    transform = torchgram.gramian_of(fn)
    for args in [case.args, case.args]:
        _assert_oracle(transform(case.params, *args), fn, case.params, *args)
    assert len(to_params) == 1  # the first call ran the taps, and chose


@pytest.mark.parametrize("name", ["transformer", "lstm", "tied_weights"])
def test_vjp_and_jd_grad_are_exact(name: str, always: None, to_params: list[None]) -> None:
    case = cases()[name]
    fn = _three_losses(case.fn)
    weights = torch.tensor([0.3, -1.2, 2.0], dtype=D)
    J = jacobian_matrix(fn, case.params, *case.args)
    for _ in range(2):  # the eager form remembers fn's signature as a transform does
        _, grads, G = torchgram.vjp_and_gramian(fn, case.params, *case.args)
    _assert_oracle(G, fn, case.params, *case.args)
    flat = torch.cat([g.reshape(-1) for g in optree.tree_leaves(grads(weights))])
    assert torch.allclose(flat, weights @ J, rtol=1e-10, atol=1e-12)
    assert len(to_params) == 1


def test_parameters_read_from_a_closure(always: None, to_params: list[None]) -> None:
    """fn reads its module's own parameters (which require no grad) instead of its argument:
    the run's copies take their place, or the Gramian would be 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model.requires_grad_(False)
    params = list(model.parameters())
    x = torch.randn(5, 4, dtype=D)

    def closure(params: Any, x: torch.Tensor) -> torch.Tensor:
        return model(x).pow(2).sum(0)

    def returned(params: Any, x: torch.Tensor) -> torch.Tensor:  # a given parameter as it is
        return model[2].bias

    for fn in (closure, returned):
        oracle = functools.partial(functional_call_list, model, fn=fn)
        expected = flat_gramian(oracle, params, x)
        transform = torchgram.gramian_of(fn)
        for _ in range(2):
            G = transform(params, x)
        assert torch.allclose(G, expected, rtol=1e-10, atol=1e-12)
    assert len(to_params) == 2


def functional_call_list(model: nn.Module, params: Any, x: torch.Tensor, fn: Callable) -> Any:
    """fn with the module's parameters swapped for ``params`` (the oracle's view of fn)."""
    named = dict(zip(dict(model.named_parameters()), params, strict=True))
    with torch.nn.utils.stateless._reparametrize_module(model, named):
        return fn(params, x)


def test_gramian_is_differentiable(always: None, to_params: list[None]) -> None:
    """Parameters that require grad: the Gramian carries their graph on every call (the taps'
    run, whose kernels all have a double backward)."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=D, requires_grad=True)
    x = torch.randn(6, 4, dtype=D)

    def fn(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ w)
        return torch.stack([h.sum(), h.pow(2).sum()])

    transform = torchgram.gramian_of(fn)
    first = torch.autograd.grad(transform(w, x).sum(), w)[0]
    second = torch.autograd.grad(transform(w, x).sum(), w)[0]
    expected = torch.autograd.grad(flat_gramian(fn, w, x).sum(), w)[0]
    assert torch.allclose(first, expected, rtol=1e-10)
    assert torch.allclose(second, expected, rtol=1e-10)
    assert to_params == []


def test_has_aux_gives_back_the_callers_parameters(always: None, to_params: list[None]) -> None:
    w, x = torch.randn(4, 3, dtype=D), torch.randn(6, 4, dtype=D)

    def fn(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = (x @ w).sum(0)
        return out, {"w": w, "out": out}

    transform = torchgram.gramian_of(fn, has_aux=True)
    for _ in range(2):
        G, aux = transform(w, x)
    assert torch.equal(aux["w"], w) and not aux["out"].requires_grad
    _assert_oracle(G, lambda w, x: fn(w, x)[0], w, x)
    assert len(to_params) == 1


def test_writes_and_gradients_inside_fn_are_refused(always: None, to_params: list[None]) -> None:
    """The tape's checks watch the run without the tape: a write into a buffer that only a
    later call makes is refused (and the buffer untouched), as is a gradient inside fn."""
    w, x = torch.randn(4, 3, dtype=D), torch.randn(6, 4, dtype=D)
    buffer = -torch.ones(3, dtype=D)
    mode = [""]

    def fn(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = x @ w
        if mode[0] == "write":
            F.relu(buffer, inplace=True)
        if mode[0] == "grad":
            h = h + torch.autograd.grad(h.sum(), w, create_graph=True)[0].sum()
        return torch.tanh(h).sum(0)

    transform = torchgram.gramian_of(fn)
    transform(w, x)
    mode[0] = "write"
    with pytest.raises(ValueError, match="changes in place a tensor it did not create"):
        transform(w, x)
    assert torch.equal(buffer, -torch.ones(3, dtype=D))
    transform = torchgram.gramian_of(fn)
    mode[0] = ""
    transform(w, x)
    mode[0] = "grad"
    with pytest.raises(ValueError, match="fn calls torch.autograd.grad"):
        transform(w, x)


def test_torchgram_inside_fn_is_refused(always: None) -> None:
    w, x = torch.randn(4, 3, dtype=D), torch.randn(6, 4, dtype=D)
    inner = [False]

    def fn(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = (x @ w).sum(0)
        if inner[0]:
            out = out + torchgram.gramian(lambda w: (x @ w).sum(0), w).sum()
        return out

    transform = torchgram.gramian_of(fn)
    transform(w, x)
    inner[0] = True
    with pytest.raises(ValueError, match="fn calls torchgram itself"):
        transform(w, x)


def test_under_vmap_the_taps_are_pulled_back(always: None, to_params: list[None]) -> None:
    """Inside a torch.func transform (an ensemble) the run stays the tape's, and exact."""
    case = cases()["mlp"]
    fn = _three_losses(case.fn)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in case.params.items()}
    transform = torchgram.gramian_of(fn)
    for _ in range(2):
        G = vmap(transform, in_dims=(0, None))(stacked, *case.args)
    for i in range(2):
        member = {k: v[i] for k, v in stacked.items()}
        _assert_oracle(G[i], fn, member, *case.args)
    assert to_params == []


class _TokenModel(nn.Module):
    """An embedding, a linear map on many tokens and a tied head: 3 losses over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.tanh(self.mix(self.embed(ids))) @ self.embed.weight.T
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(
            ids.shape
        )
        return torch.stack([loss.mean(), loss[:, 0].mean(), logits.pow(2).mean()])


def test_chosen_where_the_rules_would_build_the_gradients(to_params: list[None]) -> None:
    """Many tokens and few rows (3 losses over [16, 32] tokens): each row's gradient is built
    either way, and the pull-back to the parameters is chosen; few tokens and many rows (an
    MLP's per-sample losses without batch_dim), the ghost form saves most of the work, and the
    taps stay."""
    torch.manual_seed(0)
    model = _TokenModel().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.randint(0, 50, (16, 32))

    def tokens(params: Any, ids: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (ids,))

    transform = torchgram.gramian_of(tokens)
    for _ in range(3):
        G = transform(params, ids)
    _assert_oracle(G, tokens, params, ids)
    assert len(to_params) == 2

    mlp = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    mlp_params = {k: v.detach() for k, v in mlp.named_parameters()}
    x = torch.randn(8, 64, dtype=D)

    def per_sample(params: Any, x: torch.Tensor) -> torch.Tensor:
        return functional_call(mlp, params, (x,)).squeeze(-1)

    transform = torchgram.gramian_of(per_sample)
    for _ in range(2):
        G = transform(mlp_params, x)
    _assert_oracle(G, per_sample, mlp_params, x)
    assert len(to_params) == 2


def test_cross_gramian_from_the_parameters_gradients(always: None, to_params: list[None]) -> None:
    """cross_gramian_of without batch_dim: both runs' factors are then the rows' gradients."""
    case = cases()["transformer"]
    fn = _three_losses(case.fn)
    (x,) = case.args
    other = torch.randn_like(x)
    transform = torchgram.cross_gramian_of(fn)
    for _ in range(2):
        C = transform((case.params, x), (case.params, other))
    J_a = jacobian_matrix(fn, case.params, x)
    J_b = jacobian_matrix(fn, case.params, other)
    assert torch.allclose(C, J_a @ J_b.T, rtol=1e-10, atol=1e-12)
    assert len(to_params) == 3  # both batches share a signature: only the first run has taps


def _attended(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    q = (x @ w).unflatten(-1, (2, 2)).transpose(1, 2)  # [B, heads, T, d]
    h = F.scaled_dot_product_attention(q, q, q)
    return torch.stack([h.sum(), h.pow(2).mean(), h[0, 0, 0, 0]])


def test_differentiable_gramian_through_attention(always: None, to_params: list[None]) -> None:
    """A Gramian that carries a graph needs attention's double backward, which its fused
    kernels lack: parameters that require grad keep the taps' run (attention on its math
    kernel), and a tensor fn closes over that requires grad gets the math kernel in the run
    without the tape. Both differentiate exactly on every call."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, dtype=D)
    w = torch.randn(4, 4, dtype=D, requires_grad=True)
    transform = torchgram.gramian_of(_attended)
    with sdpa_kernel(SDPBackend.MATH):  # the oracle's own double backward
        expected = torch.autograd.grad(flat_gramian(_attended, w, x).sum(), w)[0]
    for _ in range(2):
        (grad,) = torch.autograd.grad(transform(w, x).sum(), w)
        assert torch.allclose(grad, expected, rtol=1e-10)
    assert to_params == []

    def closes_over(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _attended(w * v, x)  # the rows' gradients go back through attention

    # float32: the CPU's fused (flash) kernel takes it, where float64 goes to the math kernel
    w = w.detach().float().requires_grad_()
    v, x = torch.ones(4, 4), x.float()
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.autograd.grad(flat_gramian(closes_over, v, x).sum(), w)[0]
    transform = torchgram.gramian_of(closes_over)
    for _ in range(2):
        (grad,) = torch.autograd.grad(transform(v, x).sum(), w)
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-5)
    assert len(to_params) == 1
