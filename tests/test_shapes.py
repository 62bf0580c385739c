"""flatten and the generalized layout S + S[::-1]."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchgram import flatten
from torchgram._shapes import generalize


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    batch=st.one_of(st.none(), st.integers(0, 3)),
)
def test_generalize_then_flatten_is_the_row_major_gramian(shape, batch) -> None:
    if batch is not None and batch >= len(shape):
        batch = None
    S = torch.Size(shape)
    m = S.numel()
    J = torch.randn(m, 5, dtype=torch.float64)  # rows in the output's row-major order
    expected = J @ J.T
    # torchgram's internal rows are (k, i): per-sample element k, then sample i
    order = torch.arange(m).reshape(S)
    if batch is not None:
        order = order.movedim(batch, -1)
    internal = J[order.reshape(-1)]
    G = generalize(internal @ internal.T, S, batch)
    assert G.shape == S + S[::-1]
    assert torch.allclose(flatten(G), expected)


def test_flatten_of_square_and_scalar() -> None:
    G = torch.randn(4, 4)
    assert torch.equal(flatten(G), G)
    assert flatten(torch.tensor(2.0)).shape == (1, 1)


def test_flatten_rejects_non_gramian_shapes() -> None:
    with pytest.raises(ValueError, match=r"S \+ S\[::-1\], got \[2, 3, 2, 3\]"):
        flatten(torch.zeros(2, 3, 2, 3))
    with pytest.raises(ValueError, match="got \\[3\\]"):
        flatten(torch.zeros(3))
    with pytest.raises(TypeError, match="expected a tensor"):
        flatten([[1.0]])
