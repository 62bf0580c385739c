"""The blocked sweep of ``pcgrad`` and ``gradvac`` against their step-by-step definitions.

The oracles below are the loops the sweep replaced: one step per met row, with ``C`` and ``C G``
updated in full after each step. Same seed, same random orders: the weights and the state must
agree to rounding, across block boundaries too.
"""

from __future__ import annotations

import pytest
import torch

from torchgram import weightings as W
from torchgram.weightings import _sweep
from torchgram.weightings._gradvac import _orders
from torchgram.weightings._pcgrad import _permutations


def _pcgrad_loop(G: torch.Tensor) -> torch.Tensor:
    m = G.shape[0]
    orders = _permutations(m, None, G.device)
    rows = torch.arange(m)
    C = torch.eye(m, dtype=G.dtype)
    diagonal = torch.diagonal(G)
    for t in range(m):
        j = orders[:, t]
        inner = (G[j] * C).sum(dim=1)
        safe = torch.where(diagonal[j] > 0, diagonal[j], 1.0)
        step = torch.where((inner < 0) & (j != rows) & (diagonal[j] > 0), inner / safe, 0.0)
        C = C - step.unsqueeze(1) * torch.nn.functional.one_hot(j, m).to(G.dtype)
    return C.sum(dim=0)


def _gradvac_loop(
    G: torch.Tensor, phi: torch.Tensor, beta: float = 0.5, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    m = G.shape[0]
    C, CG = torch.eye(m, dtype=G.dtype), G.clone()
    orders = _orders(m, None, G.device)
    for t in range(m - 1):
        j = orders[:, t]
        one_hot = torch.nn.functional.one_hot(j, m).to(G.dtype)
        dot = (CG * one_hot).sum(dim=1)
        norm_i = (CG * C).sum(dim=1).clamp(min=0.0).sqrt()
        norm_j = torch.diagonal(G)[j].clamp(min=0.0).sqrt()
        cosine = dot / (norm_i * norm_j + eps)
        target = (phi * one_hot).sum(dim=1)
        sin_cosine = (1.0 - cosine * cosine).clamp(min=0.0).sqrt()
        sin_target = (1.0 - target * target).clamp(min=0.0).sqrt()
        correction = (
            norm_i * (target * sin_cosine - cosine * sin_target) / (norm_j * sin_target + eps)
        )
        correction = torch.where(cosine < target, correction, 0.0)
        C = C + correction.unsqueeze(1) * one_hot
        CG = CG + correction.unsqueeze(1) * G[j]
        phi = phi + one_hot * (beta * (cosine - target)).unsqueeze(1)
    return C.sum(dim=0), phi


def _gramian(m: int, dtype: torch.dtype) -> torch.Tensor:
    J = torch.randn(m, max(m // 2, 1), generator=torch.Generator().manual_seed(m), dtype=dtype)
    return J @ J.T  # rank m/2: many conflicts, and rows met after their projection is zero


@pytest.fixture(params=[3, 128], ids=["blocks of 3", "blocks of 128"])
def block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(_sweep, "_BLOCK", request.param)
    return int(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 2, 7, 20])
def test_pcgrad_equals_its_loop(m: int, dtype: torch.dtype, block: int) -> None:
    G = _gramian(m, dtype)
    torch.manual_seed(0)
    expected = _pcgrad_loop(G)
    torch.manual_seed(0)
    torch.testing.assert_close(W.pcgrad(G), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 2, 7, 20])
def test_gradvac_equals_its_loop_over_calls(m: int, dtype: torch.dtype, block: int) -> None:
    G = _gramian(m, dtype)
    state, phi = None, torch.zeros(m, m, dtype=dtype)
    for call in range(3):  # the targets move: later calls make corrections
        torch.manual_seed(call)
        expected, phi = _gradvac_loop(G, phi)
        torch.manual_seed(call)
        w, state = W.gradvac(G, state=state)
        torch.testing.assert_close(w, expected)
        torch.testing.assert_close(
            state.phi, phi, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0
        )
