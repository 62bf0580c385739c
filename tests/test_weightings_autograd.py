"""The differentiability claims of the docs, the solver's accuracy, and the stateful pattern."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from torchgram import weightings as W
from torchgram.weightings._dual_cone import _kkt_residual, _project_weights


def _gramian(m: int, n: int, seed: int = 0) -> torch.Tensor:
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return J @ J.T


@pytest.mark.parametrize(
    "f",
    [W.aligned_mtl, W.fairgrad, partial(W.fairgrad, alpha=2.0), partial(W.nash_mtl, max_norm=0.0),
     lambda G: W.cr_mogm(G, weighting=W.aligned_mtl, initial_weights=torch.ones(4).double())[0]],
)  # fmt: skip
def test_differentiable_weightings_pass_gradcheck(f) -> None:  # type: ignore[no-untyped-def]
    J = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    J.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda J: f(J @ J.T), (J,))


def test_mgda_has_a_gradient() -> None:
    G = _gramian(4, 3).requires_grad_(True)
    (grad,) = torch.autograd.grad(W.mgda(G) @ torch.arange(4.0).double(), G)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("f", [W.upgrad, W.dualproj])
def test_non_differentiable_weightings_are_detached(f) -> None:  # type: ignore[no-untyped-def]
    G = _gramian(4, 3).requires_grad_(True)
    assert not f(G).requires_grad


@pytest.mark.parametrize(("m", "n"), [(3, 1), (16, 2), (64, 8), (200, 30), (40, 80)])
def test_solver_kkt_residual_in_float64(m: int, n: int) -> None:
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    J = J * torch.logspace(-2, 2, m, dtype=torch.float64).unsqueeze(1)  # badly scaled rows
    U = torch.diag(torch.rand(m, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    V = _project_weights(U, J @ J.T, norm_eps=1e-4, reg_eps=1e-4, max_iters=500, tol=None)
    assert (V >= U).all()
    assert _kkt_residual(V, U, J @ J.T, norm_eps=1e-4, reg_eps=1e-4) < 1e-9


def test_solver_under_vmap_runs_all_iterations_and_agrees() -> None:
    stack = torch.stack([_gramian(6, 2, seed) for seed in range(3)])
    torch.testing.assert_close(
        torch.func.vmap(W.upgrad)(stack), torch.stack([W.upgrad(G) for G in stack])
    )


def test_state_is_an_immutable_named_tuple_threaded_through_calls() -> None:
    G = _gramian(3, 2)
    torch.manual_seed(0)
    w1, s1 = W.gradvac(G)
    w2, s2 = W.gradvac(G, state=s1)
    assert isinstance(s2, W.GradVacState) and s2.phi.shape == (3, 3)
    assert not torch.equal(s1.phi, s2.phi)
    with pytest.raises(AttributeError):
        s2.phi = torch.zeros(3, 3)  # type: ignore[misc]
    w, s = W.cr_mogm(G, weighting=W.mean)
    assert isinstance(s, W.CRMOGMState) and torch.equal(s.weights, w)
