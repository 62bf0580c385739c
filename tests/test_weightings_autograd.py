"""The differentiability claims of the docs, the solver's accuracy, and the stateful pattern."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from torchgram import weightings as W
from torchgram.weightings._dual_cone import _kkt_residual, _project_weights, _until_next_check


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 3, 8, 64])
def test_mgda_on_python_floats_takes_the_steps_of_the_torch_loop(m: int, dtype) -> None:
    """Without gradient, outside transforms, mgda iterates on Python floats (float64); with a
    Gramian that requires grad, on torch ops: the same steps, so the same weights up to
    rounding (float32 input: float32's rounding). Also a zero G (e_0), a rank-1 G and an
    asymmetric one."""
    J = torch.randn(m, 2 * m, generator=torch.Generator().manual_seed(m), dtype=dtype)
    u = torch.rand(m, generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.5
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    asymmetric = J @ J.T + torch.triu(torch.ones(m, m, dtype=dtype), diagonal=1)
    for G in (J @ J.T, torch.zeros(m, m, dtype=dtype), torch.outer(u, u), asymmetric):
        on_floats = W.mgda(G)
        on_torch = W.mgda(G.clone().requires_grad_(True)).detach()
        assert on_floats.dtype == dtype and not on_floats.requires_grad
        torch.testing.assert_close(on_floats, on_torch, atol=tolerance, rtol=0.0)


def test_mgda_carries_forward_mode_derivatives() -> None:
    """Under jvp (and forward-mode AD) mgda iterates on torch ops, so the tangent is the one
    reverse mode gives."""
    J = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dJ = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = lambda J: W.mgda(J @ J.T)
    _, tangent = torch.func.jvp(weights, (J,), (dJ,))
    expected = torch.einsum("wij,ij->w", torch.func.jacrev(weights)(J), dJ)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(tangent, expected)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(J, dJ)
        forward = torch.autograd.forward_ad.unpack_dual(weights(dual)).tangent
    assert forward is not None
    torch.testing.assert_close(forward, expected)


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


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        (None, (10, 1e-3), 10),  # no rate yet: the second check 10 iterations on
        ((10, 1e-3), (20, 2e-5), 8),  # 10^-0.17 per iteration: 2e-5 to 1e-6 in 7.6
        ((10, 1e-3), (20, 1e-3), 20),  # stalled: the most iterations between checks
        ((10, 1e-3), (20, 2e-3), 20),  # rising
        ((10, 1e-1), (20, 1e-2), 20),  # slow: capped
        ((20, 1e-5), (21, 1.1e-6), 1),  # the next iteration at least
    ],
)
def test_solver_checks_where_the_rate_predicts_convergence(previous, current, expected) -> None:
    assert _until_next_check(previous, current, tol=1e-5) == expected


@pytest.mark.parametrize("tol", [0.0, -1.0])
def test_solver_without_a_positive_tolerance_runs_max_iters(tol: float) -> None:
    """No rate can reach a tolerance of 0: the checks stay 20 iterations apart."""
    assert _until_next_check((10, 1e-3), (20, 1e-5), tol=tol) == 20
    G = _gramian(6, 3, 0)
    torch.testing.assert_close(W.upgrad(G, tol=tol, max_iters=50), W.upgrad(G, max_iters=50))


def test_solver_stops_soon_after_convergence(monkeypatch) -> None:
    """Checks after 10 and 20 iterations, then where the rate predicts: within 35 iterations
    the solver has seen a residual below the tolerance (checking every 20 iterations, it
    would not have), and its weights are those of a far tighter solve."""
    import torchgram.weightings._dual_cone as dual_cone

    checks: list[float] = []
    residual = dual_cone._box_residual

    def counting(*args):  # type: ignore[no-untyped-def]
        checks.append(float(residual(*args)))
        return residual(*args)

    monkeypatch.setattr(dual_cone, "_box_residual", counting)
    G = _gramian(64, 128, 0)
    w = W.upgrad(G, tol=1e-6, max_iters=35)
    assert len(checks) == 3 and checks[-1] <= 1e-6 < min(checks[:-1]), checks
    torch.testing.assert_close(w, W.upgrad(G, tol=1e-12, max_iters=2000), atol=1e-7, rtol=0)


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


def _rank_deficient() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``J`` [5, 2] (so ``J Jᵀ`` has rank 2), a direction ``E`` for it and a vector ``c``."""
    generator = torch.Generator().manual_seed(0)
    J, E, c = (
        torch.randn(*shape, generator=generator).double() for shape in [(5, 2), (5, 2), (5,)]
    )
    return J, E, c


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_derivative_at_a_rank_deficient_gramian(scale_mode: str) -> None:
    # Along perturbations that keep the rank, G(t) = (J + tE)(J + tE)ᵀ, the weights are smooth and
    # the gradient with respect to G gives their derivative (oracle: central differences).
    J, E, c = _rank_deficient()
    f = lambda G: W.aligned_mtl(G, scale_mode=scale_mode) @ c
    G = (J @ J.T).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(G), G)
    t = 1e-6
    finite_difference = (f((J + t * E) @ (J + t * E).T) - f((J - t * E) @ (J - t * E).T)) / (2 * t)
    directional = (grad * (E @ J.T + J @ E.T)).sum()
    torch.testing.assert_close(directional, finite_difference, rtol=1e-7, atol=0)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_is_discontinuous_across_the_null_space(scale_mode: str) -> None:
    # As documented: lifting a zero eigenvalue above the rounding level moves the weights by O(1)
    # however small the lift, and the gradient is zero in those directions.
    J, _, c = _rank_deficient()
    f = lambda G: W.aligned_mtl(G, scale_mode=scale_mode) @ c
    G = (J @ J.T).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(G), G)
    Q, _, _ = torch.linalg.svd(J)
    null = Q[:, 2:] @ Q[:, 2:].T  # projector onto the null space of G
    assert (null @ grad @ null).abs().max() < 1e-12 * grad.abs().max()
    q = Q[:, 2]
    for t in [1e-6, 1e-9]:
        assert (f(G.detach() + t * torch.outer(q, q)) - f(G.detach())).abs() > 1e-2


@pytest.mark.parametrize("f", [W.fairgrad, W.nash_mtl])
def test_fair_weightings_have_a_zero_gradient_where_no_solution_exists(f) -> None:  # type: ignore[no-untyped-def]
    u = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    G = torch.outer(u, u).requires_grad_(True)  # Pareto-stationary: zero weights
    (grad,) = torch.autograd.grad(f(G) @ torch.arange(3.0).double(), G)
    assert torch.equal(grad, torch.zeros_like(grad))
