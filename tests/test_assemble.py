"""The assembly of leaf Gramians: exact, and with ``release`` it lets go of each leaf's factors."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from oracle import flat_gramian
from torch import nn
from torch.func import functional_call

import torchgram
from torchgram import _assemble, _run, _transform

D = torch.float64


def _setting():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Flatten(),
        nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 1),
    ).double()  # fmt: skip
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(params, x):
        return functional_call(model, params, (x,)).squeeze(-1)

    return fn, params, torch.randn(5, 2, 4, 4, dtype=D)


@pytest.mark.parametrize("release", [False, True])
def test_release_drops_each_leafs_factors(monkeypatch, release) -> None:
    fn, params, x = _setting()
    options = _transform._options(fn, "test", 0, False, True)
    _, run = _transform._linearise(fn, (params, x), (0,), 0, options)
    seen: list[weakref.ref] = []
    alive_before = []
    group_gramian = _assemble._group_gramian

    def spy(factors, *args):
        gc.collect()
        alive_before.append(sum(ref() is not None for ref in seen))  # factors of earlier leaves
        seen.extend(weakref.ref(f) for f in factors)
        return group_gramian(factors, *args)

    monkeypatch.setattr(_assemble, "_group_gramian", spy)
    monkeypatch.setattr(_assemble, "_REUSE_GAIN", math.inf)  # every leaf by _group_gramian
    G = run.gramian(release=release)
    assert torch.allclose(G, flat_gramian(fn, params, x), rtol=1e-10, atol=1e-12)
    groups = len(params) - 2  # each linear layer's bias goes with its weight
    assert len(alive_before) == groups
    if release:  # each leaf's factors go once its Gramian is added, and nothing else holds data
        assert alive_before == [0] * groups
        assert not run.records and not run.cotangents
    else:  # kept for a vjp
        assert alive_before == list(range(groups))
        assert len(run.vjp(torch.ones(5, dtype=D))) == len(params)


def test_gramian_of_releases_its_factors(monkeypatch) -> None:
    fn, params, x = _setting()
    releases = []
    original = _run.Linearised.gramian

    def spy(self, release=False):
        releases.append(release)
        return original(self, release)

    monkeypatch.setattr(_run.Linearised, "gramian", spy)
    transform = torchgram.gramian_of(fn, batch_dim=0)
    transform(params, x)  # the first call also compares the batched run with the vmapped one
    torchgram.vjp_and_gramian(fn, params, x, batch_dim=0)  # remembered for fn, as well
    releases.clear()
    transform(params, x)
    out, vjp_fn, G = torchgram.vjp_and_gramian(fn, params, x, batch_dim=0)
    vjp_fn(torch.ones_like(out))
    assert releases == [True, False]


def _folded(monkeypatch) -> list[bool]:
    """Spies on the weight-and-bias Gramian: one entry per weight tried, whether it folded."""
    folds: list[bool] = []
    with_bias = _assemble._with_bias

    def spy(factors, *args):
        G = with_bias(factors, *args)
        if getattr(factors[0], "bias", None) is not None:  # a weight with a bias partner
            folds.append(G is not None)
        return G

    monkeypatch.setattr(_assemble, "_with_bias", spy)
    return folds


def _check(fn, params, x, batch_dim=0) -> None:
    # one run (no first-call comparison of runs, which would assemble three Gramians)
    G = torchgram.gramian(fn, params, x, batch_dim=batch_dim, check_samples=False)
    expected = flat_gramian(fn, params, x)
    assert torch.allclose(torchgram.flatten(G), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialised"])
@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("tokens", [1, 4])
def test_weight_and_bias_in_one_ghost_gramian(monkeypatch, ghost, batch_dim, rows, tokens) -> None:
    """Whole-leaf weight and bias of a linear map, each used once: one ghost Gramian for both
    (none in the materialised form), exact with one or several rows per sample and tokens."""
    from torchgram import _factors

    monkeypatch.setattr(_factors, "use_ghost", lambda *shapes: ghost)
    folds = _folded(monkeypatch)
    torch.manual_seed(0)
    layer = nn.Linear(6, rows).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(5, tokens, 6, dtype=D)

    def fn(params, x):
        return torch.tanh(functional_call(layer, params, (x,))).sum(1)  # [B, rows]

    _check(fn, params, x, batch_dim)
    assert folds == [ghost]


def test_bias_used_elsewhere_or_materialised_form_is_not_folded(monkeypatch) -> None:
    folds = _folded(monkeypatch)
    torch.manual_seed(0)
    w, b = torch.randn(3, 4, dtype=D), torch.randn(3, dtype=D)
    x = torch.randn(5, 4, dtype=D)

    def shared_bias(params, x):  # the bias is also added on its own
        h = torch.nn.functional.linear(x, params["w"], params["b"])
        return (torch.tanh(h) + params["b"]).pow(2).sum(-1)

    _check(shared_bias, {"w": w, "b": b}, x)
    assert folds == [False]

    folds.clear()

    def weight_twice(params, x):  # the weight has two factors
        h = torch.nn.functional.linear(x, params["w"], params["b"])
        return (torch.tanh(h) @ params["w"]).pow(2).sum(-1)

    _check(weight_twice, {"w": w[:, :3], "b": b}, x[:, :3])
    assert folds == [False]

    folds.clear()
    long_x = torch.randn(2, 40, 4, dtype=D)  # 40 tokens of width 4: the materialised form

    def sequence(params, x):
        return torch.nn.functional.linear(x, params["w"], params["b"]).pow(2).sum((-1, -2))

    _check(sequence, {"w": w, "b": b}, long_x)
    assert folds == [False]


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("tokens", [1, 3])
def test_maps_of_the_same_activations_share_one_ghost_gramian(monkeypatch, batch_dim, tokens):
    """Heads on one trunk: the maps of the same activations with a bias go into one ghost
    Gramian, those without one into another; a map of other activations and a weight used twice
    stay on their own. Exact, with one token or several (the ghost form chosen then)."""
    from torchgram import _factors

    if tokens > 1:  # the cost model would materialise the gradients of 17 rows per sample
        monkeypatch.setattr(_factors, "use_ghost", lambda *shapes: True)
        monkeypatch.setattr(_assemble, "use_ghost", lambda *shapes: True)
    shared: list[int] = []
    shared_gramian = _assemble._shared_gramian

    def spy(group, *args):
        shared.append(len(group))
        return shared_gramian(group, *args)

    monkeypatch.setattr(_assemble, "_shared_gramian", spy)
    torch.manual_seed(0)
    names = ("w1", "b1", "w2", "b2", "w3", "w4", "w5", "w6")
    shapes = ((2, 5), (2,), (3, 5), (3,), (1, 5), (2, 5), (4, 3), (5, 5))
    params = {n: torch.randn(s, dtype=D) for n, s in zip(names, shapes, strict=True)}
    x = torch.randn(4, tokens, 5, dtype=D)
    F = torch.nn.functional

    def fn(params, x):
        h = torch.tanh(x)
        heads = [
            F.linear(h, params["w1"], params["b1"]),
            F.linear(h, params["w2"], params["b2"]),
            F.linear(h, params["w3"]),
            F.linear(h, params["w4"]),
            F.linear(torch.sin(h[..., :3]), params["w5"]),  # other activations
            F.linear(h, params["w6"]) @ params["w6"],  # a weight used twice
        ]
        return torch.cat([torch.tanh(z).pow(2).sum(-2) for z in heads], -1)  # [B, 17]

    _check(fn, params, x, batch_dim)
    assert sorted(shared) == [2, 2]
