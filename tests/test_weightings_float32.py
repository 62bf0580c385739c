"""Float32 weightings against float64, beyond the default options that
``test_weightings_degenerate.test_float32_agrees_with_float64`` checks: preferences, the other
scale modes, the options that change the problem solved (CAGrad's ``c``, FairGrad's ``alpha``,
Nash-MTL's cap, Krum's selection), and the stateful weightings over several calls, state
included (each step's float32 state feeds the next; ``modo`` and ``sdmgrad`` on non-symmetric
inputs, as cross-Gramians are)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_weightings_properties import NAMES, weights

from torchgram import weightings as W

D = torch.float64
M = 10
PREF = torch.linspace(0.5, 2.0, M, dtype=D)


def _gramian(seed: int) -> torch.Tensor:
    """The Gramians of the default-options test: rows scaled 1 to 30, condition up to 1e4."""
    J = torch.randn(M, 18, generator=torch.Generator().manual_seed(seed), dtype=D)
    J = J * torch.logspace(-0.75, 0.75, M, dtype=D).unsqueeze(1)
    return J @ J.T


def _gradvac_over_three_calls(G: torch.Tensor) -> torch.Tensor:
    """The third call's weights and state."""
    state = None
    for step in range(3):
        torch.manual_seed(step)
        Gs = G * (1 + step) + step * torch.eye(M, dtype=G.dtype)
        w, state = W.gradvac(Gs, state=state, beta=0.3)
    return torch.cat([w, state.phi.flatten()])


def _cr_mogm_over_three_calls(G: torch.Tensor) -> torch.Tensor:
    """The third call's weights (which are its state) around upgrad."""
    state = None
    for step in range(3):
        Gs = G + step * G.diagonal().mean() * torch.eye(M, dtype=G.dtype)
        w, state = W.cr_mogm(Gs, weighting=W.upgrad, state=state, alpha=0.7)
    return w


def _modo_over_three_calls(G: torch.Tensor) -> torch.Tensor:
    """The third call's weights (which are its state), on non-symmetric inputs as cross-Gramians."""
    state = None
    for step in range(3):
        Gs = G + step * torch.triu(G, diagonal=1)
        w, state = W.modo(Gs / G.diagonal().mean(), state=state, gamma=0.5)
    return w


def _sdmgrad_over_three_calls(G: torch.Tensor) -> torch.Tensor:
    """The third call's weights and state, with a preference and lr=0.1 (w inside the simplex)."""
    state = None
    for step in range(3):
        Gs = G + step * torch.triu(G, diagonal=1)
        w, state = W.sdmgrad(Gs, state=state, lr=0.1, pref=PREF.to(G.dtype) / PREF.sum())
    return torch.cat([w, state.w])


# name -> (weights of G, accuracy of float32 relative to the largest float64 weight). Each is
# about twice to three times what the method reaches on these Gramians (so a tenfold loss
# fails): the float32 solver tolerance (1e-5) for the dual-cone projections, rounding amplified
# by the conditioning for aligned_mtl and cagrad (whose c=1 problem is the flattest), rounding
# for the others.
CASES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "upgrad-pref": (lambda G: W.upgrad(G, pref=PREF.to(G.dtype)), 3e-5),
    "dualproj-pref": (lambda G: W.dualproj(G, pref=PREF.to(G.dtype)), 3e-5),
    "aligned_mtl-median": (lambda G: W.aligned_mtl(G, scale_mode="median"), 1e-3),
    "aligned_mtl-rmse": (lambda G: W.aligned_mtl(G, scale_mode="rmse"), 1e-3),
    "aligned_mtl-pref": (lambda G: W.aligned_mtl(G, pref=PREF.to(G.dtype)), 1.5e-3),
    "cagrad-c0": (lambda G: W.cagrad(G, c=0.0), 1e-6),
    "cagrad-c1": (lambda G: W.cagrad(G, c=1.0), 5e-4),
    "cagrad-c10": (lambda G: W.cagrad(G, c=10.0), 3e-5),
    "fairgrad-alpha0.5": (lambda G: W.fairgrad(G, alpha=0.5), 1e-6),
    "fairgrad-alpha2": (lambda G: W.fairgrad(G, alpha=2.0), 1e-6),
    "nash_mtl-uncapped": (lambda G: W.nash_mtl(G, max_norm=0.0), 1e-6),
    "nash_mtl-capped": (lambda G: W.nash_mtl(G, max_norm=0.1), 1e-6),
    "krum-two-of-nine": (lambda G: W.krum(G, n_byzantine=1, n_selected=2), 1e-6),
    "constant": (lambda G: W.constant(G, weights=PREF.to(G.dtype)), 1e-6),
    "cr_mogm-upgrad": (lambda G: W.cr_mogm(G, weighting=W.upgrad)[0], 3e-5),
    "cr_mogm-three-calls": (_cr_mogm_over_three_calls, 3e-5),
    "gradvac-three-calls": (_gradvac_over_three_calls, 1e-6),
    "modo-three-calls": (_modo_over_three_calls, 1e-6),
    "sdmgrad-three-calls": (_sdmgrad_over_three_calls, 1e-6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_agrees_with_float64(name: str) -> None:
    weights, accuracy = CASES[name]
    for seed in range(5):
        G = _gramian(seed)
        torch.manual_seed(0)
        single = weights(G.float())
        torch.manual_seed(0)
        double = weights(G)
        assert single.dtype == torch.float32
        atol = accuracy * double.abs().max().item()
        torch.testing.assert_close(single.double(), double, atol=atol, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_float32_generalized_gramian_agrees_with_float64(name: str) -> None:
    """A ``[B, K, K, B]`` Gramian in float32: the weights ``[B, K]`` of its flattening."""
    J = torch.randn(5, 2, 14, generator=torch.Generator().manual_seed(0), dtype=D)
    G = torch.einsum("ikp,jlp->iklj", J, J)
    single, double = weights(name, G.float()), weights(name, G)
    assert single.shape == (5, 2) and single.dtype == torch.float32
    atol = 3e-5 * double.abs().max().item()
    torch.testing.assert_close(single.double(), double, atol=atol, rtol=0)
