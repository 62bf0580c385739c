"""Properties shared by weightings: shapes, symmetries, non-conflict, vmap, generalized G.

Every weighting of ``torchgram.weightings.__all__`` is checked, so a new one cannot be forgotten:
the tables below hold only what differs between weightings, the options one cannot be called
without and the properties a method does not have. A new weighting is held to every property
until it is listed there. The other weighting tests take ``NAMES`` and ``weights`` from here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchgram import weightings as W

NAMES = sorted(name for name in W.__all__ if inspect.isfunction(getattr(W, name)))
# The options a weighting needs, from the number of rows m.
OPTIONS: dict[str, Callable[[int], dict[str, object]]] = {
    "constant": lambda m: {"weights": torch.arange(1.0, m + 1)},
    "cr_mogm": lambda m: {"weighting": W.mgda},
    "krum": lambda m: {"n_byzantine": 0},  # >= 2 neighbours: no systematic ties
}
NEEDS_THREE_ROWS = {"krum"}  # m >= n_byzantine + 3


def _takes(option: str) -> list[str]:
    """The weightings that take ``option``."""
    return [name for name in NAMES if option in inspect.signature(getattr(W, name)).parameters]


RANDOM = _takes("generator")
PREFERENCE = _takes("pref")
DETERMINISTIC = [name for name in NAMES if name not in RANDOM]
NOT_PERMUTATION_EQUIVARIANT = {"constant"}  # fixed weights, whatever the order of the rows
# fairgrad, nash_mtl: c G gives c^(-alpha/(alpha+1)) w, w / sqrt(c); modo: gamma is a step size in
# the units of G, so c G takes a c times longer step; sdmgrad: invariant but for the 1e-8 it adds
# to its normalisation, which its default inner solve (lr=10) carries to 1e-5 in the weights now
# and then (1e-2 on cross-Gramians; test_weightings_cross checks the invariance at lr=0.1).
NOT_SCALE_INVARIANT = {"fairgrad", "nash_mtl", "modo", "sdmgrad"}
NON_CONFLICTING = ["upgrad", "dualproj", "mgda"]


def needed_options(name: str, m: int) -> dict[str, object]:
    """The options that ``name`` cannot be called without, for ``m`` rows."""
    return OPTIONS[name](m) if name in OPTIONS else {}


def weights(name: str, G: torch.Tensor, **options: object) -> torch.Tensor:
    """The weights of ``name`` for ``G``, with the options it needs and ``options``, torch's
    global generator seeded with 0, and without the state of a stateful weighting."""
    torch.manual_seed(0)
    m = math.prod(G.shape[: G.ndim // 2])
    out = getattr(W, name)(G, **needed_options(name, m), **options)
    return out[0] if isinstance(out, tuple) else out


def test_the_tables_name_weightings() -> None:
    listed = {*OPTIONS, *NEEDS_THREE_ROWS, *NOT_PERMUTATION_EQUIVARIANT, *NOT_SCALE_INVARIANT}
    assert listed | {*NON_CONFLICTING} <= set(NAMES)


def _gramian(m: int, n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return J @ J.T


gramians = st.builds(
    _gramian, m=st.integers(4, 7), n=st.integers(8, 12), seed=st.integers(0, 2**16)
)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_finite(name: str, dtype: torch.dtype) -> None:
    G = _gramian(5, 8, seed=1, dtype=dtype)
    w = weights(name, G)
    assert w.shape == (5,) and w.dtype == dtype and torch.isfinite(w).all()


@pytest.mark.parametrize("name", [n for n in DETERMINISTIC if n not in NOT_PERMUTATION_EQUIVARIANT])
@settings(max_examples=8, deadline=None)
@given(G=gramians, seed=st.integers(0, 2**16))
def test_permutation_equivariance(name: str, G: torch.Tensor, seed: int) -> None:
    perm = torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(seed))
    permuted = weights(name, G[perm][:, perm])
    torch.testing.assert_close(permuted, weights(name, G)[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in NOT_SCALE_INVARIANT])
@settings(max_examples=8, deadline=None)
@given(G=gramians, scale=st.sampled_from([1e-3, 0.5, 7.0, 1e3]))
def test_scale_invariance(name: str, G: torch.Tensor, scale: float) -> None:
    torch.testing.assert_close(weights(name, scale * G), weights(name, G), atol=1e-5, rtol=1e-5)


def test_fairgrad_scaling_law() -> None:
    G, alpha, c = _gramian(4, 6, seed=3), 2.0, 10.0
    expected = c ** (-alpha / (alpha + 1)) * W.fairgrad(G, alpha=alpha)
    torch.testing.assert_close(W.fairgrad(c * G, alpha=alpha), expected)


@pytest.mark.parametrize("name", NON_CONFLICTING)
@settings(max_examples=10, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_non_conflict(name: str, m: int, n: int, seed: int) -> None:
    G = _gramian(m, n, seed)
    w = weights(name, G)
    # upgrad/dualproj regularise by reg_eps * trace(G): that is the only slack they have. MGDA's
    # Frank-Wolfe stops at steps below epsilon=1e-3, which leaves a slack of that order.
    relative = 1e-3 if name == "mgda" else 1e-8
    slack = 1e-4 * G.trace() * w.abs() + relative * G.trace()
    assert (G @ w >= -slack).all()


@pytest.mark.parametrize("name", [n for n in NON_CONFLICTING if n in PREFERENCE])
def test_non_conflicting_rows_give_the_preference(name: str) -> None:
    J = torch.rand(5, 7, dtype=torch.float64)  # positive entries: all inner products positive
    pref = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], dtype=torch.float64)
    torch.testing.assert_close(weights(name, J @ J.T), W.mean(J @ J.T))
    torch.testing.assert_close(weights(name, J @ J.T, pref=pref), pref)


@pytest.mark.parametrize(
    ("name", "factor"),
    [("upgrad", 1.0), ("dualproj", 1.0), ("mgda", 1.0), ("imtl_g", 1.0), ("aligned_mtl", 1.0),
     ("cagrad", 1.5), ("sum", 4.0), ("fairgrad", 4.0)],
)  # fmt: skip
def test_identity_gramian_gives_a_multiple_of_mean(name: str, factor: float) -> None:
    G = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(weights(name, G), factor * W.mean(G))


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
    stack = torch.stack([_gramian(5, 8, seed) for seed in range(3)])
    looped = torch.stack([weights(name, G) for G in stack])
    batched = torch.func.vmap(partial(weights, name))(stack)
    torch.testing.assert_close(batched, looped, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", RANDOM)
def test_vmap_with_same_randomness_equals_reseeded_loop(name: str) -> None:
    stack = torch.stack([_gramian(5, 8, seed) for seed in range(3)])
    looped = torch.stack([weights(name, G) for G in stack])
    batched = torch.func.vmap(partial(weights, name), randomness="same")(stack)
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("name", NAMES)
def test_generalized_gramian_gives_reshaped_weights(name: str) -> None:
    J = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G_gen = torch.einsum("bkp,clp->bklc", J, J)  # [B, K, K, B]
    flat = J.reshape(6, 7)
    torch.testing.assert_close(weights(name, G_gen), weights(name, flat @ flat.T).reshape(2, 3))


@pytest.mark.parametrize("name", [n for n in NAMES if n not in NEEDS_THREE_ROWS])
def test_zero_dimensional_output(name: str) -> None:
    w = weights(name, torch.tensor(2.0, dtype=torch.float64))
    assert w.shape == () and torch.isfinite(w)


def test_constant_and_preferences_accept_output_shape() -> None:
    G = torch.eye(6).reshape(2, 3, 3, 2)
    w = torch.arange(6.0).reshape(2, 3)
    torch.testing.assert_close(W.constant(G, weights=w), w)
    torch.testing.assert_close(W.constant(G, weights=w.flatten()), w)
    torch.testing.assert_close(W.upgrad(G, pref=w), w)


def test_weightings_do_not_modify_their_input() -> None:
    G = _gramian(5, 3, seed=0)
    copy = G.clone()
    for name in NAMES:
        weights(name, G)
    assert torch.equal(G, copy)
