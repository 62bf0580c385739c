"""set_grad: directions into .grad for torch.optim."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchgram


def test_set_grad_on_a_module_lets_an_optimizer_step() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(params, x):
        return torch.func.functional_call(model, params, (x,)).pow(2).sum(-1)

    direction = torchgram.jd_grad(losses, torchgram.weightings.mean, batch_dim=0)(params, x)
    torchgram.set_grad(model, direction)
    expected = torch.func.grad(lambda p: losses(p, x).mean())(params)
    before = model.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.allclose(model.weight, before - 0.1 * expected["weight"], atol=1e-6)


def test_set_grad_accumulates_and_takes_pytrees() -> None:
    w = torch.zeros(2, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    torchgram.set_grad({"w": w, "b": [b]}, {"w": torch.ones(2), "b": [torch.ones(1)]})
    torchgram.set_grad({"w": w}, {"w": torch.ones(2)}, accumulate=True)
    assert torch.equal(w.grad, torch.full((2,), 2.0))
    assert torch.equal(b.grad, torch.ones(1))


def test_set_grad_replaces_in_place_and_never_aliases() -> None:
    """A second call writes into the ``.grad`` the first made (as ``backward`` does), and the
    ``.grad`` never is the given tensor, which the caller may change after."""
    w = torch.zeros(3, requires_grad=True)
    given = torch.ones(3)
    torchgram.set_grad({"w": w}, {"w": given})
    first = w.grad
    assert first is not given
    given.add_(1.0)
    assert torch.equal(w.grad, torch.ones(3))
    torchgram.set_grad({"w": w}, {"w": torch.full((3,), 5.0)})
    assert w.grad is first and torch.equal(first, torch.full((3,), 5.0))
    strided = torch.zeros(6)
    w.grad = strided[::2]  # not written in place: a view into another tensor's memory
    torchgram.set_grad({"w": w}, {"w": torch.ones(3)})
    assert torch.equal(w.grad, torch.ones(3)) and torch.equal(strided, torch.zeros(6))


def test_set_grad_swapping_two_gradients() -> None:
    """A given gradient that is another parameter's current .grad is read before any write."""
    a = torch.zeros(1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.ones(1), torch.full((1,), 2.0)
    torchgram.set_grad({"a": a, "b": b}, {"a": b.grad, "b": a.grad})
    assert torch.equal(a.grad, torch.full((1,), 2.0)) and torch.equal(b.grad, torch.ones(1))


def test_set_grad_errors() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"\['nope'\] are not parameters"):
        torchgram.set_grad(model, {"nope": torch.ones(1)})
    with pytest.raises(ValueError, match=r"must be a tensor of shape \[2\], got \[3\]"):
        torchgram.set_grad(model, {"bias": torch.ones(3)})
    with pytest.raises(TypeError, match="grads must be a dict"):
        torchgram.set_grad(model, [torch.ones(2)])
    with pytest.raises(ValueError, match="structure of params"):
        torchgram.set_grad({"w": torch.zeros(2)}, {"v": torch.zeros(2)})
