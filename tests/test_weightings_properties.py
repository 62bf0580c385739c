"""Properties shared by weightings: shapes, symmetries, non-conflict, vmap, generalized G."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchgram import weightings as W

Weighting = Callable[[torch.Tensor], torch.Tensor]

DETERMINISTIC: dict[str, Weighting] = {
    "upgrad": W.upgrad,
    "dualproj": W.dualproj,
    "mgda": W.mgda,
    "cagrad": W.cagrad,
    "imtl_g": W.imtl_g,
    "aligned_mtl": W.aligned_mtl,
    "krum": partial(W.krum, n_byzantine=0),  # >= 2 neighbours: no systematic ties
    "fairgrad": W.fairgrad,
    "nash_mtl": W.nash_mtl,
    "mean": W.mean,
    "sum": W.sum,
    "cr_mogm": lambda G: W.cr_mogm(G, weighting=W.mgda)[0],
}
RANDOM: dict[str, Weighting] = {
    "random": W.random,
    "pcgrad": W.pcgrad,
    "gradvac": lambda G: W.gradvac(G)[0],
}
ALL = {**DETERMINISTIC, **RANDOM}
SCALE_INVARIANT = [
    "upgrad", "dualproj", "mgda", "cagrad", "imtl_g", "aligned_mtl", "krum", "mean", "sum",
    "cr_mogm", "pcgrad", "gradvac",
]  # fmt: skip
NON_CONFLICTING = ["upgrad", "dualproj", "mgda"]


def _gramian(m: int, n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return J @ J.T


def _seeded(f: Weighting, G: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    return f(G)


gramians = st.builds(
    _gramian, m=st.integers(4, 7), n=st.integers(8, 12), seed=st.integers(0, 2**16)
)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_finite(name: str, dtype: torch.dtype) -> None:
    G = _gramian(5, 8, seed=1, dtype=dtype)
    w = ALL[name](G)
    assert w.shape == (5,) and w.dtype == dtype and torch.isfinite(w).all()


@pytest.mark.parametrize("name", DETERMINISTIC)
@settings(max_examples=8, deadline=None)
@given(G=gramians, seed=st.integers(0, 2**16))
def test_permutation_equivariance(name: str, G: torch.Tensor, seed: int) -> None:
    perm = torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(seed))
    f = DETERMINISTIC[name]
    torch.testing.assert_close(f(G[perm][:, perm]), f(G)[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SCALE_INVARIANT)
@settings(max_examples=8, deadline=None)
@given(G=gramians, scale=st.sampled_from([1e-3, 0.5, 7.0, 1e3]))
def test_scale_invariance(name: str, G: torch.Tensor, scale: float) -> None:
    f = ALL[name]
    torch.testing.assert_close(_seeded(f, scale * G), _seeded(f, G), atol=1e-5, rtol=1e-5)


def test_fairgrad_scaling_law() -> None:
    G, alpha, c = _gramian(4, 6, seed=3), 2.0, 10.0
    expected = c ** (-alpha / (alpha + 1)) * W.fairgrad(G, alpha=alpha)
    torch.testing.assert_close(W.fairgrad(c * G, alpha=alpha), expected)


@pytest.mark.parametrize("name", NON_CONFLICTING)
@settings(max_examples=10, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_non_conflict(name: str, m: int, n: int, seed: int) -> None:
    G = _gramian(m, n, seed)
    w = DETERMINISTIC[name](G)
    # upgrad/dualproj regularise by reg_eps * trace(G): that is the only slack they have. MGDA's
    # Frank-Wolfe stops at steps below epsilon=1e-3, which leaves a slack of that order.
    relative = 1e-3 if name == "mgda" else 1e-8
    slack = 1e-4 * G.trace() * w.abs() + relative * G.trace()
    assert (G @ w >= -slack).all()


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_non_conflicting_rows_give_the_preference(name: str) -> None:
    J = torch.rand(5, 7, dtype=torch.float64)  # positive entries: all inner products positive
    pref = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], dtype=torch.float64)
    f = DETERMINISTIC[name]
    torch.testing.assert_close(f(J @ J.T), W.mean(J @ J.T))
    torch.testing.assert_close(f(J @ J.T, pref=pref), pref)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("name", "factor"),
    [("upgrad", 1.0), ("dualproj", 1.0), ("mgda", 1.0), ("imtl_g", 1.0), ("aligned_mtl", 1.0),
     ("cagrad", 1.5), ("sum", 4.0), ("fairgrad", 4.0)],
)  # fmt: skip
def test_identity_gramian_gives_a_multiple_of_mean(name: str, factor: float) -> None:
    G = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(DETERMINISTIC[name](G), factor * W.mean(G))


def test_zero_gramian() -> None:
    Z = torch.zeros(3, 3)
    for f in (W.upgrad, W.dualproj, W.aligned_mtl):
        torch.testing.assert_close(f(Z), W.mean(Z))
    torch.testing.assert_close(W.mgda(Z), torch.tensor([1.0, 0.0, 0.0]))  # as TorchJD
    for f in (W.imtl_g, W.cagrad):
        torch.testing.assert_close(f(Z), torch.zeros(3))
    torch.testing.assert_close(W.pcgrad(Z), torch.ones(3))
    torch.testing.assert_close(W.gradvac(Z)[0], torch.ones(3))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_vmap_equals_loop(name: str) -> None:
    f = DETERMINISTIC[name]
    stack = torch.stack([_gramian(5, 8, seed) for seed in range(3)])
    looped = torch.stack([f(G) for G in stack])
    torch.testing.assert_close(torch.func.vmap(f)(stack), looped, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", RANDOM)
def test_vmap_with_same_randomness_equals_reseeded_loop(name: str) -> None:
    f = RANDOM[name]
    stack = torch.stack([_gramian(5, 8, seed) for seed in range(3)])
    looped = torch.stack([_seeded(f, G) for G in stack])
    torch.manual_seed(0)
    batched = torch.func.vmap(f, randomness="same")(stack)
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("name", ALL)
def test_generalized_gramian_gives_reshaped_weights(name: str) -> None:
    J = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G_gen = torch.einsum("bkp,clp->bklc", J, J)  # [B, K, K, B]
    flat = J.reshape(6, 7)
    f = ALL[name]
    torch.testing.assert_close(_seeded(f, G_gen), _seeded(f, flat @ flat.T).reshape(2, 3))


@pytest.mark.parametrize("name", [n for n in ALL if n != "krum"])
def test_zero_dimensional_output(name: str) -> None:
    w = _seeded(ALL[name], torch.tensor(2.0, dtype=torch.float64))
    assert w.shape == () and torch.isfinite(w)


def test_constant_and_preferences_accept_output_shape() -> None:
    G = torch.eye(6).reshape(2, 3, 3, 2)
    weights = torch.arange(6.0).reshape(2, 3)
    torch.testing.assert_close(W.constant(G, weights=weights), weights)
    torch.testing.assert_close(W.constant(G, weights=weights.flatten()), weights)
    torch.testing.assert_close(W.upgrad(G, pref=weights), weights)


def test_weightings_do_not_modify_their_input() -> None:
    G = _gramian(5, 3, seed=0)
    copy = G.clone()
    for f in ALL.values():
        f(G)
    assert torch.equal(G, copy)
