"""Degenerate Gramians: zero, rank 1, slightly indefinite, m = 1, m = 0, NaN or inf, float16.

Every weighting of ``torchgram.weightings.__all__`` is checked (``NAMES``, called with the options
of ``test_weightings_properties``), so a new one cannot be forgotten. The expected values are those
its docstring documents.
"""

from __future__ import annotations

import pytest
import torch
from test_weightings_properties import NAMES, NEEDS_THREE_ROWS, NOT_SCALE_INVARIANT, weights

from torchgram import weightings as W

DTYPE = torch.float64


def _rank_one(u: list[float]) -> torch.Tensor:
    v = torch.tensor(u, dtype=DTYPE)
    return torch.outer(v, v)


def _indefinite(G: torch.Tensor) -> torch.Tensor:
    """``G`` with its smallest eigenvalue moved to ``-1e-7 λmax``: indefinite by rounding."""
    eigenvalues, Q = torch.linalg.eigh(G)
    q = Q[:, 0]
    return G - (eigenvalues[0] + 1e-7 * eigenvalues[-1]) * torch.outer(q, q)


def _not_pareto_stationary() -> torch.Tensor:
    """A rank-3 ``[5, 5]`` Gramian whose rows all have a positive first entry."""
    J = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    J[:, 0] = J[:, 0].abs() + 1.0
    return J @ J.T


U_POSITIVE = [2.0, 0.5, 1.5, 1.0, 3.0]
U_MIXED = [1.0, -2.0, 0.5, 1.5, -0.5]  # a positive combination of these rows is zero
PSD = _not_pareto_stationary()
INDEFINITE = _indefinite(PSD)
CASES = {
    "zero": torch.zeros(5, 5, dtype=DTYPE),
    "rank one": _rank_one(U_POSITIVE),
    "rank one, conflicting": _rank_one(U_MIXED),
    "indefinite": INDEFINITE,
    "indefinite, conflicting": _indefinite(_rank_one(U_MIXED)),
    "m = 1": torch.tensor([[4.0]], dtype=DTYPE),
}


@pytest.mark.parametrize("case", ["indefinite", "indefinite, conflicting"])
def test_the_indefinite_cases_are_indefinite_at_rounding_level(case: str) -> None:
    eigenvalues = torch.linalg.eigvalsh(CASES[case])
    assert -2e-7 < eigenvalues[0] / eigenvalues[-1] < -0.5e-7


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_finite_weights_of_the_right_shape(name: str, case: str) -> None:
    G = CASES[case]
    if name in NEEDS_THREE_ROWS and G.shape[0] < 3:
        with pytest.raises(ValueError, match=rf"^{name}\(G\): expected at least"):
            weights(name, G)
        return
    w = weights(name, G)
    assert w.shape == G.shape[:1] and w.dtype == DTYPE and torch.isfinite(w).all()


def _uniform(m: int) -> torch.Tensor:
    return torch.full((m,), 1.0 / m, dtype=DTYPE)


def _basis(m: int, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(k), m).to(DTYPE)


def _closed_forms(u: torch.Tensor) -> dict[str, torch.Tensor]:
    """The documented weights for ``G = u uᵀ`` with ``u > 0``."""
    m = u.shape[0]
    return {
        "mgda": _basis(m, int(u.argmin())),
        "cr_mogm": _basis(m, int(u.argmin())),
        "imtl_g": u / u.sum(),
        "aligned_mtl": (u @ _uniform(m)) / (u @ u) * u,
        "fairgrad": 1.0 / (m**0.5 * u),
        "nash_mtl": 1.0 / (m * u),  # 1 / (sqrt(m) u) has update norm sqrt(m): capped to 1
        "pcgrad": torch.ones(m, dtype=DTYPE),
        "gradvac": torch.ones(m, dtype=DTYPE),
    }


EXPECTED: dict[str, dict[str, torch.Tensor]] = {
    "zero": {
        **{
            name: _uniform(5)
            for name in ["upgrad", "dualproj", "aligned_mtl", "mean", "modo", "sdmgrad"]
        },
        **{
            name: torch.zeros(5, dtype=DTYPE)
            for name in ["cagrad", "imtl_g", "fairgrad", "nash_mtl"]
        },
        **{name: torch.ones(5, dtype=DTYPE) for name in ["pcgrad", "gradvac", "sum"]},
        "mgda": _basis(5, 0),
        "cr_mogm": _basis(5, 0),
        "constant": torch.arange(1.0, 6.0, dtype=DTYPE),
    },
    "rank one": _closed_forms(torch.tensor(U_POSITIVE, dtype=DTYPE)),
    **{
        case: {
            "fairgrad": torch.zeros(5, dtype=DTYPE),
            "nash_mtl": torch.zeros(5, dtype=DTYPE),
            "imtl_g": torch.tensor(U_MIXED, dtype=DTYPE) / sum(U_MIXED),
            "aligned_mtl": _closed_forms(torch.tensor(U_MIXED, dtype=DTYPE))["aligned_mtl"],
        }
        for case in ["rank one, conflicting", "indefinite, conflicting"]
    },
    "m = 1": {
        **{name: torch.ones(1, dtype=DTYPE) for name in NAMES if name not in ("krum", "cagrad")},
        "cagrad": torch.tensor([1.5], dtype=DTYPE),  # 1 + c
        "fairgrad": torch.tensor([0.5], dtype=DTYPE),  # G^(-1/2)
        "nash_mtl": torch.tensor([0.5], dtype=DTYPE),
    },
}


@pytest.mark.parametrize(
    ("case", "name"), [(case, name) for case, table in EXPECTED.items() for name in table]
)
def test_documented_weights(case: str, name: str) -> None:
    expected = EXPECTED[case][name]
    torch.testing.assert_close(weights(name, CASES[case]), expected, atol=1e-9, rtol=1e-7)


def test_fairgrad_on_a_rank_one_gramian_for_another_alpha() -> None:
    u, alpha = torch.tensor(U_POSITIVE, dtype=DTYPE), 2.0
    s = (u ** (1 - alpha)).sum() ** (1 / (1 + alpha))
    torch.testing.assert_close(W.fairgrad(torch.outer(u, u), alpha=alpha), (s * u) ** -alpha)


# An absolute scale on G: the norm_eps thresholds, and the eps that gradvac adds to denominators.
ABSOLUTE_THRESHOLD = {"upgrad", "dualproj", "cagrad", "gradvac"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "name", [n for n in NAMES if n not in ABSOLUTE_THRESHOLD | NOT_SCALE_INVARIANT]
)
def test_extreme_scales(name: str, dtype: torch.dtype) -> None:
    # Invariant to scaling over 56 orders of magnitude: no absolute tolerance on G's values.
    G = PSD.to(dtype)
    for c in [1e-28, 1e-14, 1e14, 1e28]:
        torch.testing.assert_close(weights(name, c * G), weights(name, G))


def test_zero_gramian_gives_one_selected_row_for_krum() -> None:
    w = weights("krum", CASES["zero"])
    assert sorted(w.tolist()) == [0.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("name", NAMES)
def test_rounding_level_indefiniteness_changes_little(name: str) -> None:
    # The weights of the indefinite Gramian are those of the positive semi-definite one it
    # rounds: every weighting is continuous there (no rank change, no tie).
    torch.testing.assert_close(weights(name, INDEFINITE), weights(name, PSD), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(0, 0), (0, 3, 3, 0)])
@pytest.mark.parametrize("name", NAMES)
def test_empty_gramian_gives_empty_weights(name: str, shape: tuple[int, ...]) -> None:
    G = torch.zeros(shape, dtype=DTYPE)
    if name in NEEDS_THREE_ROWS:
        with pytest.raises(ValueError, match=rf"^{name}\(G\): expected at least .* got m=0"):
            weights(name, G)
        return
    assert weights(name, G).shape == shape[: len(shape) // 2]


def _non_finite(value: float, where: str) -> torch.Tensor:
    G = torch.eye(4, dtype=DTYPE)
    if where == "diagonal":
        G[2, 2] = value
    else:
        G[0, 3] = G[3, 0] = value
    return G


@pytest.mark.parametrize("where", ["diagonal", "off-diagonal"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", NAMES)
def test_nan_or_inf_raises(name: str, value: float, where: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\(G[^)]*\): G holds NaN or inf values"):
        weights(name, _non_finite(value, where))


@pytest.mark.parametrize("name", NAMES)
def test_nan_under_vmap_gives_nan_weights(name: str) -> None:
    stack = torch.stack([torch.eye(4, dtype=DTYPE) + 0.5, _non_finite(torch.nan, "diagonal")])
    torch.manual_seed(0)
    batched = torch.func.vmap(lambda G: weights(name, G), randomness="same")(stack)
    assert torch.isnan(batched[1]).all()
    torch.testing.assert_close(batched[0], weights(name, stack[0]))


def _assert_close_relative_to_the_largest(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: float
) -> None:
    atol = tolerance * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _well_conditioned(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    J = torch.randn(5, 12, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return J @ J.T


# The options of the comparisons between precisions below. sdmgrad's default inner solve (20 steps
# of size lr=10, which mostly end at a corner of the simplex) carries a rounding-level change of G
# to another corner now and then (bfloat16 moves its weights by 0.8 on these Gramians, float32 by
# 5e-6): that is the method, not its accuracy, which lr=1 (no amplification) measures.
ROUNDING_OPTIONS: dict[str, dict[str, object]] = {"sdmgrad": {"lr": 1.0}}


@pytest.mark.parametrize(("half", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_is_computed_in_float32(
    name: str, half: torch.dtype, tolerance: float
) -> None:
    options = ROUNDING_OPTIONS.get(name, {})
    for seed in range(3):
        G = _well_conditioned(seed)
        w = weights(name, G.to(half), **options)
        assert w.dtype == half
        # Exactly the float32 computation on the rounded Gramian, rounded once at the end.
        assert torch.equal(w, weights(name, G.to(half).float(), **options).to(half))
        # Close to the float32 weights: only the rounding of G (2^-11 or 2^-8) separates them.
        _assert_close_relative_to_the_largest(w.float(), weights(name, G, **options), tolerance)


# Accuracy of float32 relative to float64 on the Gramians below (condition numbers up to 1e4), about
# twice what each method reaches there: rounding amplified by the conditioning for imtl_g,
# aligned_mtl and cagrad, the float32 solver tolerance (1e-5) for upgrad and dualproj, rounding
# for the others. A tenfold loss fails.
FLOAT32_ACCURACY = {
    "upgrad": 3e-5,
    "dualproj": 2e-5,
    "cagrad": 5e-4,
    "imtl_g": 2e-3,
    "aligned_mtl": 1e-3,
}


@pytest.mark.parametrize("name", NAMES)
def test_float32_agrees_with_float64(name: str) -> None:
    tolerance = FLOAT32_ACCURACY.get(name, 1e-6)
    options = ROUNDING_OPTIONS.get(name, {})
    for seed in range(5):
        J = torch.randn(10, 18, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
        J = J * torch.logspace(-0.75, 0.75, 10, dtype=DTYPE).unsqueeze(1)  # rows scaled 1 to 30
        G = J @ J.T
        _assert_close_relative_to_the_largest(
            weights(name, G.float(), **options).double(), weights(name, G, **options), tolerance
        )


def test_the_tables_name_weightings() -> None:
    listed = {
        *ABSOLUTE_THRESHOLD,
        *FLOAT32_ACCURACY,
        *ROUNDING_OPTIONS,
        *(n for table in EXPECTED.values() for n in table),
    }
    assert listed <= set(NAMES)
