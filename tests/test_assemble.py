"""The assembly of leaf Gramians: exact, and with ``release`` it lets go of each leaf's factors."""

from __future__ import annotations

import gc
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
    leaf_gramian = _assemble._leaf_gramian

    def spy(factors, *args):
        gc.collect()
        alive_before.append(sum(ref() is not None for ref in seen))  # factors of earlier leaves
        seen.extend(weakref.ref(f) for f in factors)
        return leaf_gramian(factors, *args)

    monkeypatch.setattr(_assemble, "_leaf_gramian", spy)
    G = run.gramian(release=release)
    assert torch.allclose(G, flat_gramian(fn, params, x), rtol=1e-10, atol=1e-12)
    assert len(alive_before) == len(params)
    if release:  # each leaf's factors go once its Gramian is added, and nothing else holds data
        assert alive_before == [0] * len(params)
        assert not run.records and not run.cotangents
    else:  # kept for a vjp
        assert alive_before == list(range(len(params)))
        assert len(run.vjp(torch.ones(5, dtype=D))) == len(params)


def test_gramian_of_releases_its_factors(monkeypatch) -> None:
    fn, params, x = _setting()
    releases = []
    original = _run.Linearised.gramian

    def spy(self, release=False):
        releases.append(release)
        return original(self, release)

    monkeypatch.setattr(_run.Linearised, "gramian", spy)
    torchgram.gramian_of(fn, batch_dim=0)(params, x)
    out, vjp_fn, G = torchgram.vjp_and_gramian(fn, params, x, batch_dim=0)
    vjp_fn(torch.ones_like(out))
    assert releases == [True, False]
