"""The norm rules (``torchgram._ops.norm``): layer_norm's closed form reads the op's ``eps``.

The closed form runs where layer_norm is tapped on its output: the batched run (fn on the whole
batch, taken where fn calls attention). Its ``eps`` is given positionally by ``nn.LayerNorm``
(``test_batched`` gives it as a keyword), and made large next to the variance of the normalised
features, so that a rule that ignored it would be far off. Without ``batch_dim`` (and under
vmap) the affine parameters are tapped and torch computes with ``eps`` itself: exact there too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import flat_gramian
from rule_check import check_exact, rule_counts
from torch import nn
from torch.func import functional_call

import torchgram
from torchgram import _run

D = torch.float64
B, T, WIDTH = 4, 3, 6
EPS = 0.5


@pytest.fixture
def batched_runs(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each batched run tried: whether it was made (not None)."""
    made: list[bool] = []
    real = _run.linearise_batched

    def spy(*args):
        result = real(*args)
        made.append(result is not None)
        return result

    monkeypatch.setattr(_run, "linearise_batched", spy)
    return made


class Block(nn.Module):
    """A linear map, self-attention, a layer norm with a large ``eps``: ``[B, T, d] -> [B]``."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH, eps=eps)
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        h = F.scaled_dot_product_attention(h, h, h)
        return self.head(self.norm(h)).squeeze(-1).pow(2).sum(-1)


def _problem(eps: float = EPS):
    torch.manual_seed(0)
    model = Block(eps).double()
    with torch.no_grad():  # affine parameters away from 1 and 0, so that both matter
        model.norm.weight.copy_(torch.linspace(0.5, 2.0, WIDTH, dtype=D))
        model.norm.bias.copy_(torch.linspace(-1.0, 1.0, WIDTH, dtype=D))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = 0.3 * torch.randn(B, T, WIDTH, dtype=D)  # the variance of the features is below eps

    def fn(params, x):
        return functional_call(model, params, (x,))

    return fn, params, x


def test_the_eps_matters_here() -> None:
    """The problem can tell a rule that ignores eps: the Gramian with the default eps is far
    from the one with EPS."""
    fn, params, x = _problem()
    default, _, _ = _problem(eps=1e-5)
    G, other = flat_gramian(fn, params, x), flat_gramian(default, params, x)
    assert float((G - other).abs().max()) > 0.1 * float(G.abs().max())


def test_layer_norm_eps_in_the_batched_run(batched_runs) -> None:
    fn, params, x = _problem()
    expected = flat_gramian(fn, params, x)
    transform = torchgram.gramian_of(fn, batch_dim=0)
    for _ in range(2):  # checked against the vmapped run, then alone
        G = transform(params, x)
        torch.testing.assert_close(
            G, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max())
        )
    # the batched run was made on both calls, and kept: its Gramian agreed with the vmapped
    # one on the first (a wrong closed form would have been replaced by the vmapped run there)
    assert batched_runs == [True, True]


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_layer_norm_eps_with_its_parameters_tapped(batch_dim) -> None:
    fn, params, x = _problem()
    if batch_dim is None:
        G = torchgram.gramian(fn, params, x)
    else:  # checked, not batched (check_samples=False): the vmapped run alone
        G = torchgram.gramian(fn, params, x, batch_dim=0, check_samples=False)
    expected = flat_gramian(fn, params, x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(torchgram.flatten(G), expected, rtol=1e-10, atol=1e-12 * scale)


def test_layer_norm_eps_in_the_vjp_of_the_batched_run(batched_runs) -> None:
    """``vjp_fn`` of the batched run (the closed form's per-sample gradients, weighted) against
    the weighted gradients from autograd."""
    fn, params, x = _problem()
    for _ in range(2):  # the eager form remembers fn: the second call runs as the first chose
        _, vjp_fn, _ = torchgram.vjp_and_gramian(fn, params, x, batch_dim=0)
    assert batched_runs == [True, True]
    weights = torch.linspace(-1.0, 2.0, B, dtype=D)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    expected = torch.autograd.grad(fn(leaves, x) @ weights, list(leaves.values()))
    for (name, got), want in zip(vjp_fn(weights).items(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("dims", [1, 2])
def test_batch_norm_in_eval_mode_takes_its_closed_form(monkeypatch, batch_dim, dims) -> None:
    """Eval-mode batch norm (running statistics: a per-channel affine map): its weight and bias
    by the closed form, not the generic rule, exact."""
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(3, 4, 3)
    norm = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(4, eps=0.3)
    model = nn.Sequential(conv, norm, nn.Tanh()).double().eval()
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 3, *([7] * dims), dtype=torch.float64)

    def fn(p, x):
        return torch.func.functional_call(model, p, (x,)).pow(2).flatten(1).sum(1)

    check_exact(monkeypatch, fn, params, x, batch_dim=batch_dim)
    counts = rule_counts(fn, params, x, batch_dim=batch_dim)
    assert counts[("batch_norm", "batch_norm")] == 1
