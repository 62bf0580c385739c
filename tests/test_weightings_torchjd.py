"""Values of the weightings against TorchJD 0.18 (a test-only dependency) on fixed Gramians."""

from __future__ import annotations

import pytest
import torch

from torchgram import weightings as W

aggregation = pytest.importorskip("torchjd.aggregation")


def _gramians() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for m, n in [(2, 3), (4, 6), (5, 3), (7, 12), (6, 2)]:
        J = torch.randn(m, n, generator=generator, dtype=torch.float64)
        out.append(J @ J.T)
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0], [1.0, -3.0, 0.5]], dtype=torch.float64)
    out.append(J @ J.T)
    return out


GRAMIANS = _gramians()
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
    pytest.importorskip("scipy")
    expected = aggregation.FairGradWeighting(alpha=alpha)(G)
    torch.testing.assert_close(W.fairgrad(G, alpha=alpha), expected, atol=1e-5, rtol=1e-4)


def _cagrad_reference(G: torch.Tensor, c: float) -> torch.Tensor:
    """CAGrad's dual solved by scipy's SLSQP (TorchJD's CAGrad needs cvxpy, not installed)."""
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    Gn = (G / G.trace()).numpy()
    m = Gn.shape[0]
    b, sqrt_phi = Gn.sum(1) / m, c * np.sqrt(Gn.sum()) / m

    def objective(u):  # type: ignore[no-untyped-def]
        return b @ u + sqrt_phi * np.sqrt(max(u @ Gn @ u, 0.0))

    result = optimize.minimize(
        objective,
        np.ones(m) / m,
        bounds=[(0, 1)] * m,
        constraints=[{"type": "eq", "fun": lambda u: u.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    u = result.x
    return torch.from_numpy(1 / m + sqrt_phi / np.sqrt(u @ Gn @ u) * u)


@pytest.mark.parametrize("G", [G for G in GRAMIANS if _full_rank(G)])
@pytest.mark.parametrize("c", [0.25, 0.5, 1.0])
def test_cagrad_against_a_generic_solver(G: torch.Tensor, c: float) -> None:
    torch.testing.assert_close(W.cagrad(G, c=c), _cagrad_reference(G, c), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("G", [G for G in GRAMIANS if _full_rank(G)])
def test_nash_mtl_solves_the_bargaining_equation(G: torch.Tensor) -> None:
    # TorchJD's NashMTL needs cvxpy (not installed): check the defining equation G' w = 1 / w.
    w = W.nash_mtl(G, max_norm=0.0)
    Gn = G / torch.linalg.matrix_norm(G)
    torch.testing.assert_close(Gn @ w, 1 / w)
    capped = W.nash_mtl(G, max_norm=0.1)
    torch.testing.assert_close(torch.sqrt(capped @ G @ capped), torch.tensor(0.1).double())
