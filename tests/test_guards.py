"""Writes into tensors fn did not create never happen on the plain-autograd run: the run is handed
back to torch.func.vjp before the write, which refuses it (or lets it through when the tensor was
in fact fn's own); writes into fn's own tensors stay on the fast run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import flat_gramian

import torchgram
from torchgram import _reverse

D = torch.float64
W = {"w": torch.randn(4, 3, dtype=D)}
X = torch.randn(5, 4, dtype=D)


@pytest.fixture
def paths(monkeypatch) -> list[str]:
    taken: list[str] = []
    original = _reverse._by_vjp

    def spy(*args):
        taken.append("vjp")
        return original(*args)

    monkeypatch.setattr(_reverse, "_by_vjp", spy)
    return taken


def _check(fn, batch_dim) -> None:
    G = torchgram.gramian(fn, W, X, batch_dim=batch_dim)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, W, X), rtol=1e-10)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("how", ["method", "operator", "item"])
def test_writes_into_a_captured_tensor_are_refused_before_they_happen(batch_dim, how) -> None:
    counter = torch.zeros(3, dtype=D)

    def fn(params, x):
        h = x @ params["w"]
        if how == "method":
            counter.add_(1.0)
        elif how == "operator":
            counter.__iadd__(1.0)
        else:
            counter[0] = 1.0
        return h.pow(2).sum(-1)

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    with pytest.raises(ValueError, match="changes in place a tensor it did not create"):
        transform(W, X)
    assert torch.equal(counter, torch.zeros(3, dtype=D))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_writes_into_fns_own_tensors_stay_on_plain_autograd(paths, batch_dim) -> None:
    def fn(params, x):
        h = x @ params["w"]
        h.mul_(2.0)  # a tensor fn made
        h = torch.tanh(h)
        g = h.clone()
        g[..., 0] = 0.0
        return (h + g).pow(2).sum(-1)

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    for _ in range(2):  # the probe, then a remembered signature
        G = transform(W, X)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, W, X), rtol=1e-10)
    assert paths == []


def test_a_write_into_a_view_of_a_captured_tensor_is_handed_back(paths) -> None:
    table = torch.zeros(2, 3, dtype=D)

    def fn(params, x):
        row = table[0]  # a view fn made of a tensor it did not
        row.add_(1.0)
        return (x @ params["w"]).pow(2).sum(-1)

    with pytest.raises(ValueError, match="changes in place"):
        torchgram.gramian_of(fn, batch_dim=0)(W, X)
    assert torch.equal(table, torch.zeros(2, 3, dtype=D))


def test_a_tensor_the_tape_did_not_see_made_is_handed_back_and_computed(paths) -> None:
    """torch.from_numpy is no torch function: the write looks like one into a captured tensor,
    so the run goes to vjp, which sees fn made the tensor and lets it through."""

    def fn(params, x):
        scale = torch.from_numpy(np.full(3, 2.0))
        scale.mul_(0.5)
        return (torch.tanh(x @ params["w"]) * scale).pow(2).sum(-1)

    transform = torchgram.gramian_of(fn, batch_dim=None)
    for _ in range(2):
        _check(fn, None)
        transform(W, X)
    assert "vjp" in paths


def test_batch_norm_updating_running_statistics_is_refused(paths) -> None:
    mean, var = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)

    def fn(params, x):
        h = x @ params["w"]
        return F.batch_norm(h, mean, var, training=True).pow(2).sum(-1)

    def functional(params, x):  # torch.batch_norm: the statistics at other positions
        h = x @ params["w"]
        out = torch.batch_norm(h, None, None, mean, var, True, 0.1, 1e-5, False)
        return out.pow(2).sum(-1)

    for f in (fn, functional):
        with pytest.raises(ValueError, match="changes in place.*eval"):
            torchgram.gramian(f, W, X, batch_dim=None)
    assert torch.equal(mean, torch.zeros(3, dtype=D)) and torch.equal(var, torch.ones(3, dtype=D))

    def batch_statistics(params, x):  # no running statistics: nothing written
        return F.batch_norm(x @ params["w"], None, None, training=True).pow(2).sum(-1)

    paths.clear()
    _check(batch_statistics, None)
    assert paths == []


WRITES = {
    "inplace-keyword": lambda b: F.relu(b, inplace=True),
    "inplace-positional": lambda b: F.relu(b, True),
    "leaky-relu": lambda b: F.leaky_relu(b, 0.5, inplace=True),
    "module": lambda b: torch.nn.ReLU(inplace=True)(b),
    "contiguous": lambda b: b.contiguous().add_(1.0),
    "to": lambda b: b.to(D).add_(1.0),
    "double": lambda b: b.double().add_(1.0),
    "as-tensor": lambda b: torch.as_tensor(b).add_(1.0),
    "detach": lambda b: b.detach().add_(1.0),
    "data": lambda b: b.data.add_(1.0),
}


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("write", list(WRITES))
def test_writes_on_a_remembered_signature_are_refused(batch_dim, write) -> None:
    """The first call's probe runs under torch.func; a write that only later calls make must be
    caught on the fast run too (through an ``inplace`` flag, or an op returning its input or an
    alias of it)."""
    buffer = -torch.ones(3, dtype=D)
    armed = [False]

    def fn(params, x):
        h = x @ params["w"]
        if armed[0]:
            WRITES[write](buffer)
        return torch.tanh(h).sum(-1)

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    transform(W, X)
    armed[0] = True
    with pytest.raises(ValueError, match="changes in place a tensor it did not create"):
        transform(W, X)
    assert torch.equal(buffer, -torch.ones(3, dtype=D))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_in_place_activations_on_fns_own_tensors_stay_fast(paths, batch_dim) -> None:
    def fn(params, x):
        h = F.relu(x @ params["w"], inplace=True)
        h = torch.nn.ReLU(inplace=True)(h - 0.1)
        return h.contiguous().double().pow(2).sum(-1)

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    for _ in range(2):
        G = transform(W, X)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, W, X), rtol=1e-10)
    assert paths == []


@pytest.mark.parametrize("batch_dim", [0, None])
def test_a_write_into_the_input_of_a_parameter_use_is_refused(batch_dim) -> None:
    """The Gramian is computed from the recorded input of ``h @ v``: writing into h after it
    would change the Gramian without changing fn's output."""
    params = {"w": torch.randn(4, 3, dtype=D), "v": torch.randn(3, 2, dtype=D)}

    def fn(params, x):
        h = torch.tanh(x @ params["w"])
        y = h @ params["v"]
        h.add_(1.0)
        return y.pow(2).sum(-1) + h.sum(-1)

    with pytest.raises(ValueError, match="in place on the input of an op that uses a parameter"):
        torchgram.gramian(fn, params, X, batch_dim=batch_dim)
