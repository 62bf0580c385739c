"""Values of the weightings against TorchJD 0.18 (a test-only dependency) on fixed Gramians."""

from __future__ import annotations

from collections.abc import Callable

import cvxpy  # noqa: F401  # TorchJD's CAGrad and Nash-MTL solve with it
import pytest
import scipy  # noqa: F401  # TorchJD's FairGrad solves with it
import torch
from torchjd import aggregation

from torchgram import weightings as W

# Plain imports: the test extra installs TorchJD with its solvers, and a missing one must fail the
# suite, not skip the comparisons that are its reason to be here.


def _jacobians() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = [
        torch.randn(m, n, generator=generator, dtype=torch.float64)
        for m, n in [(2, 3), (4, 6), (5, 3), (7, 12), (6, 2)]
    ]
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0], [1.0, -3.0, 0.5]], dtype=torch.float64)
    return [*out, J]


JACOBIANS = _jacobians()
GRAMIANS = [J @ J.T for J in JACOBIANS]
PREF = torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=torch.float64)


def _full_rank(G: torch.Tensor) -> bool:
    return bool(torch.linalg.matrix_rank(G) == G.shape[0])


@pytest.mark.parametrize("G", GRAMIANS)
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (W.upgrad, lambda: aggregation.UPGradWeighting()),
        (W.dualproj, lambda: aggregation.DualProjWeighting()),
        (W.mgda, lambda: aggregation.MGDAWeighting()),
        (W.imtl_g, lambda: aggregation.IMTLGWeighting()),
        (W.aligned_mtl, lambda: aggregation.AlignedMTLWeighting()),
        (lambda G: W.aligned_mtl(G, scale_mode="median"),
         lambda: aggregation.AlignedMTLWeighting(scale_mode="median")),
        (lambda G: W.aligned_mtl(G, scale_mode="rmse"),
         lambda: aggregation.AlignedMTLWeighting(scale_mode="rmse")),
        (W.mean, lambda: aggregation.MeanWeighting()),
        (W.sum, lambda: aggregation.SumWeighting()),
    ],
)  # fmt: skip
def test_deterministic_values(G: torch.Tensor, ours, theirs) -> None:  # type: ignore[no-untyped-def]
    torch.testing.assert_close(ours(G), theirs()(G), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("G", [G for G in GRAMIANS if G.shape[0] == 4])
def test_preferences(G: torch.Tensor) -> None:
    for ours, theirs in [
        (W.upgrad, aggregation.UPGradWeighting),
        (W.dualproj, aggregation.DualProjWeighting),
        (W.aligned_mtl, aggregation.AlignedMTLWeighting),
    ]:
        torch.testing.assert_close(ours(G, pref=PREF), theirs(pref_vector=PREF)(G))
    torch.testing.assert_close(W.constant(G, weights=PREF), aggregation.ConstantWeighting(PREF)(G))


@pytest.mark.parametrize("G", [G for G in GRAMIANS if G.shape[0] >= 5])
@pytest.mark.parametrize(("n_byzantine", "n_selected"), [(0, 1), (1, 2), (2, 1)])
def test_krum(G: torch.Tensor, n_byzantine: int, n_selected: int) -> None:
    if G.shape[0] < n_byzantine + 3:
        pytest.skip("too few rows")
    expected = aggregation.KrumWeighting(n_byzantine, n_selected)(G)
    torch.testing.assert_close(W.krum(G, n_byzantine=n_byzantine, n_selected=n_selected), expected)


@pytest.mark.parametrize("G", GRAMIANS)
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (W.random, lambda: aggregation.RandomWeighting()),
        (W.pcgrad, lambda: aggregation.PCGradWeighting()),
    ],
)
def test_random_values_with_the_same_seed(G: torch.Tensor, ours, theirs) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    expected = theirs()(G)
    torch.manual_seed(3)
    torch.testing.assert_close(ours(G), expected)


@pytest.mark.parametrize("G", GRAMIANS)
def test_gradvac_over_three_calls(G: torch.Tensor) -> None:
    reference = aggregation.GradVacWeighting(beta=0.3)
    state = None
    for step in range(3):
        Gs = G * (1 + step) + step * torch.eye(G.shape[0], dtype=G.dtype)
        torch.manual_seed(step)
        expected = reference(Gs)
        torch.manual_seed(step)
        w, state = W.gradvac(Gs, state=state, beta=0.3)
        torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("G", GRAMIANS)
def test_cr_mogm_over_three_calls(G: torch.Tensor) -> None:
    m = G.shape[0]
    initial = torch.linspace(0.0, 1.0, m, dtype=G.dtype)
    reference = aggregation.CRMOGMWeighting(
        aggregation.MGDAWeighting(), alpha=0.7, initial_weights=initial
    )
    state = None
    for step in range(3):
        Gs = G + step * torch.eye(m, dtype=G.dtype)
        w, state = W.cr_mogm(Gs, weighting=W.mgda, state=state, alpha=0.7, initial_weights=initial)
        torch.testing.assert_close(w, reference(Gs))


@pytest.mark.parametrize("G", [G for G in GRAMIANS if _full_rank(G)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_fairgrad(G: torch.Tensor, alpha: float) -> None:
    expected = aggregation.FairGradWeighting(alpha=alpha)(G)
    torch.testing.assert_close(W.fairgrad(G, alpha=alpha), expected, atol=1e-5, rtol=1e-4)


def _cagrad_objective(G: torch.Tensor, w: torch.Tensor, c: float) -> torch.Tensor:
    """CAGrad's dual objective ``uᵀG'1/m + sqrt(φ) ||g_u||`` at the ``u`` encoded by ``w``."""
    m = G.shape[0]
    Gn = G / G.trace()
    u = (w - 1 / m) / (w - 1 / m).sum()  # w = 1/m + (sqrt(φ) / ||g_u||) u with u in the simplex
    return u @ Gn.sum(1) / m + c * Gn.sum().sqrt() / m * torch.sqrt(u @ Gn @ u)


@pytest.mark.parametrize("G", [G for G in GRAMIANS if _full_rank(G)])
@pytest.mark.parametrize("c", [0.25, 0.5, 1.0, 10.0])
def test_cagrad(G: torch.Tensor, c: float) -> None:
    expected = aggregation.CAGradWeighting(c=c)(G)
    w = W.cagrad(G, c=c)
    # TorchJD's interior-point solve (Clarabel) stops ~1e-9 above the optimal objective; the
    # objective is flat there, so its weights are only accurate to ~1e-5 relative. Ours reach the
    # same objective (to the 1e-8 that recovering u from w allows), and the weights agree to 1e-4
    # of their scale.
    reference = _cagrad_objective(G, expected, c)
    assert _cagrad_objective(G, w, c) <= reference + 1e-8 * reference.abs().clamp(min=1.0)
    torch.testing.assert_close(w, expected, atol=1e-4 * expected.abs().max().item(), rtol=0.0)


@pytest.mark.parametrize("J", [*JACOBIANS, torch.zeros(3, 2, dtype=torch.float64)])
@pytest.mark.parametrize("c", [0.0, 0.5, 1.0, 10.0])
def test_cagrad_updates(J: torch.Tensor, c: float) -> None:
    # With a rank-deficient G the weights are not unique (e.g. for c >= 1 and the origin in the
    # hull of the rows, TorchJD returns zero weights and we a combination of the rows that is
    # zero): compare the updates Jᵀw, relative to the mean gradient and the update. The tolerance
    # is TorchJD's accuracy: on the hand-made J and c=1 its update is off by 1.2e-4 in a coordinate
    # that is exactly 0 at the optimum (ours: 4e-15).
    expected = aggregation.CAGradWeighting(c=c)(J @ J.T)
    update = J.T @ W.cagrad(J @ J.T, c=c)
    scale = torch.maximum(J.mean(dim=0).norm(), (J.T @ expected).norm())
    assert (update - J.T @ expected).norm() <= 3e-4 * scale + 1e-12


def _nash_mtl_reference(m: int, **options: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """TorchJD's Nash-MTL weighting (on the matrix ``J``, not the Gramian) with a fresh state."""
    return aggregation.NashMTL(n_tasks=m, **options).weighting  # type: ignore[arg-type]


FULL_RANK_JACOBIANS = [J for J in JACOBIANS if _full_rank(J @ J.T)]
_NOT_DPP = "ignore:You are solving a parameterized problem that is not DPP"  # cvxpy, in TorchJD


@pytest.mark.filterwarnings(_NOT_DPP)
@pytest.mark.parametrize("J", FULL_RANK_JACOBIANS)
@pytest.mark.parametrize("max_norm", [0.0, 1.0, 3.0])
def test_nash_mtl_first_call(J: torch.Tensor, max_norm: float) -> None:
    # TorchJD's convex-concave iterations (optim_niter=20, from w = 1) converge to the solution of
    # G w = 1 / w that our Newton steps compute, up to ECOS's tolerance.
    expected = _nash_mtl_reference(J.shape[0], max_norm=max_norm)(J)
    w = W.nash_mtl(J @ J.T, max_norm=max_norm)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings(_NOT_DPP)
@pytest.mark.parametrize("J", FULL_RANK_JACOBIANS)
def test_nash_mtl_warm_started_calls(J: torch.Tensor) -> None:
    # TorchJD warm-starts each call from the previous weights: that changes its path, not the
    # point it reaches. update_weights_every=k reuses the weights k calls: call ours every k calls.
    reference = _nash_mtl_reference(J.shape[0], max_norm=0.0, update_weights_every=2)
    for step in range(4):
        Js = J * (1 + step) + 0.1 * step
        expected = reference(Js)
        solved = Js if step % 2 == 0 else J * step + 0.1 * (step - 1)
        torch.testing.assert_close(W.nash_mtl(solved @ solved.T, max_norm=0.0), expected)


@pytest.mark.parametrize("G", [G for G in GRAMIANS if _full_rank(G)])
def test_nash_mtl_solves_the_bargaining_equation(G: torch.Tensor) -> None:
    w = W.nash_mtl(G, max_norm=0.0)
    torch.testing.assert_close(G @ w, 1 / w)
    capped = W.nash_mtl(G, max_norm=0.1)
    torch.testing.assert_close(torch.sqrt(capped @ G @ capped), torch.tensor(0.1).double())
