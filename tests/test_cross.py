"""Cross-Gramians ``J_a J_bᵀ`` between two batches, against the jacrev oracle in float64."""

from __future__ import annotations

import pytest
import torch
from oracle import jacobian_matrix
from zoo import cases

import torchgram
from torchgram import _assemble_cross
from torchgram._assemble_cross import embedding_cross, linear_cross
from torchgram._factors import Linear
from torchgram._ops.embedding import Embedding

CASES = cases()


def _flat(G: torch.Tensor, n: int) -> torch.Tensor:
    """``S_a + S_b[::-1]`` -> ``[prod S_a, prod S_b]``, rows and columns in row-major order."""
    order = [*range(n), *reversed(range(n, G.dim()))]
    G = G.permute(order)
    rows = G.shape[:n].numel()
    return G.reshape(rows, -1)


def _other_batch(args: tuple) -> tuple:
    """A second batch of another size (4 samples against 3) and other values."""
    out = []
    for a in args:
        if a.is_floating_point():
            out.append(torch.cat([a.flip(0) * 0.7 + 0.1, a[:1] - 0.2]))
        else:
            out.append(torch.cat([a.flip(0).roll(1, dims=-1), a[:1]]))
    return tuple(out)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = b.abs().max().clamp(min=1e-30)
    return a.shape == b.shape and float((a - b).abs().max() / scale) < 1e-10


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cross_gramian_matches_oracle(name, batch_dim) -> None:
    case = CASES[name]
    args_a, args_b = case.args, _other_batch(case.args)
    G = torchgram.cross_gramian(
        case.fn, case.params, args_a, args_b, batch_dim=batch_dim, **case.kwargs
    )
    out_a = case.fn(case.params, *args_a)
    J_a = jacobian_matrix(case.fn, case.params, *args_a)
    J_b = jacobian_matrix(case.fn, case.params, *args_b)
    out_b = case.fn(case.params, *args_b)
    assert G.shape == (*out_a.shape, *reversed(out_b.shape))
    assert _close(_flat(G, out_a.dim()), J_a @ J_b.T)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "tied_weights", "lstm"])
def test_same_batch_gives_the_gramian(name, batch_dim) -> None:
    case = CASES[name]
    G = torchgram.gramian(case.fn, case.params, *case.args, batch_dim=batch_dim)
    cross = torchgram.cross_gramian(case.fn, case.params, case.args, case.args, batch_dim=batch_dim)
    assert _close(cross, G)


def test_generalized_output_with_batch_inside() -> None:
    """An output ``[K, B]`` with batch_dim=1: the cross-Gramian ``[K, B_a, B_b, K]``."""
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "v": torch.randn(3, dtype=torch.float64)}

    def fn(params, x):
        h = torch.tanh(x @ params["w"])  # [B, 3]
        return torch.stack([h.sum(-1), (h * params["v"]).pow(2).sum(-1)])  # [2, B]

    x_a, x_b = torch.randn(5, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    G = torchgram.cross_gramian(fn, params, (x_a,), (x_b,), batch_dim=1)
    assert G.shape == (2, 5, 2, 2)
    expected = jacobian_matrix(fn, params, x_a) @ jacobian_matrix(fn, params, x_b).T
    assert _close(_flat(G, 2), expected)


def test_transform_form_and_aux() -> None:
    case = CASES["mlp"]
    args_b = _other_batch(case.args)

    def fn(params, x):
        out = case.fn(params, x)
        return out, out.detach().sum()

    transform = torchgram.cross_gramian_of(fn, batch_dim=0, has_aux=True)
    G, (aux_a, aux_b) = transform((case.params, *case.args), (case.params, *args_b))
    expected = torchgram.cross_gramian(case.fn, case.params, case.args, args_b, batch_dim=0)
    assert _close(G, expected)
    # aux as gramian returns it (per sample with batch_dim)
    _, expected_a = torchgram.gramian(fn, case.params, *case.args, batch_dim=0, has_aux=True)
    _, expected_b = torchgram.gramian(fn, case.params, *args_b, batch_dim=0, has_aux=True)
    assert torch.equal(aux_a, expected_a) and torch.equal(aux_b, expected_b)


@pytest.mark.parametrize("name", ["mlp", "tied_weights", "cnn", "conv1d_embedding"])
def test_small_chunks_give_the_same_result(name) -> None:
    case = CASES[name]
    args_b = _other_batch(case.args)
    full = torchgram.cross_gramian(case.fn, case.params, case.args, args_b, batch_dim=0)
    small = torchgram.cross_gramian(
        case.fn, case.params, case.args, args_b, batch_dim=0, max_chunk_bytes=64
    )
    assert _close(small, full)


def test_vmap_over_an_ensemble() -> None:
    case = CASES["mlp"]
    args_b = _other_batch(case.args)
    stacked = {k: torch.stack([v, 0.5 * v, -v]) for k, v in case.params.items()}

    def one(params):
        return torchgram.cross_gramian(case.fn, params, case.args, args_b, batch_dim=0)

    G = torch.func.vmap(one)(stacked)
    for i in range(3):
        member = {k: v[i] for k, v in stacked.items()}
        J_a = jacobian_matrix(case.fn, member, *case.args)
        J_b = jacobian_matrix(case.fn, member, *args_b)
        assert _close(G[i], J_a @ J_b.T)


def test_empty_batch_gives_an_empty_cross_gramian() -> None:
    case = CASES["mlp"]
    empty = (case.args[0][:0],)
    G = torchgram.cross_gramian(case.fn, case.params, case.args, empty, batch_dim=None)
    assert G.shape == (3, 0)


def _materialised(a, b) -> torch.Tensor:
    ga, gb = a.materialise(), b.materialise()
    return ga.reshape(ga.shape[0] * ga.shape[1], -1) @ gb.reshape(gb.shape[0] * gb.shape[1], -1).T


@pytest.mark.parametrize(
    ("tokens", "width", "ghost"), [(1, 3, True), (2, 50, True), (40, 2, False)]
)
def test_linear_cross_forms(monkeypatch, tokens, width, ghost) -> None:
    """Both forms agree with the materialised product; the cost model picks the expected one."""
    torch.manual_seed(0)
    a = Linear(None, torch.randn(3, tokens, width).double(), torch.randn(2, 3, tokens, 4).double())
    b = Linear(
        None, torch.randn(5, tokens + 1, width).double(), torch.randn(1, 5, tokens + 1, 4).double()
    )
    used: list[bool] = []
    original = _assemble_cross.cross_ghost
    monkeypatch.setattr(
        _assemble_cross, "cross_ghost", lambda *x: used.append(True) or original(*x)
    )
    for chunk in (64, 2**30):
        assert _close(linear_cross(a, b, chunk), _materialised(a, b))
    assert bool(used) == ghost


@pytest.mark.parametrize(("tokens", "vocab", "ghost"), [(2, 1000, True), (30, 4, False)])
def test_embedding_cross_forms(monkeypatch, tokens, vocab, ghost) -> None:
    torch.manual_seed(0)
    a = Embedding(None, torch.randint(0, vocab, (3, tokens)), torch.randn(2, 3, tokens, 6), vocab)
    b = Embedding(None, torch.randint(0, vocab, (4, tokens)), torch.randn(2, 4, tokens, 6), vocab)
    used: list[bool] = []
    original = _assemble_cross.cross_ghost
    monkeypatch.setattr(
        _assemble_cross, "cross_ghost", lambda *x: used.append(True) or original(*x)
    )
    for chunk in (64, 2**30):
        assert torch.allclose(embedding_cross(a, b, chunk), _materialised(a, b), atol=1e-4)
    assert bool(used) == ghost


def test_different_parameters_are_refused() -> None:
    case = CASES["mlp"]
    other = {k: v.clone() for k, v in case.params.items()}
    transform = torchgram.cross_gramian_of(case.fn, batch_dim=0)
    with pytest.raises(ValueError, match=r"cross_gramian_of\(fn, batch_dim=0\): the parameters"):
        transform((case.params, *case.args), (other, *case.args))


def test_arguments_must_be_tuples() -> None:
    case = CASES["mlp"]
    with pytest.raises(TypeError, match=r"cross_gramian\(fn, batch_dim=0\): args_b must be a"):
        torchgram.cross_gramian(case.fn, case.params, case.args, case.args[0], batch_dim=0)


def test_convolutions_cross_as_linear_maps_of_patches(monkeypatch) -> None:
    """Ungrouped convolutions take the linear cross form on their patches (the grouped ones
    their per-sample gradients); exact either way."""
    from torchgram._ops.conv_factor import Conv

    seen: list[int] = []
    original = Conv.as_linear
    monkeypatch.setattr(Conv, "as_linear", lambda self: seen.append(self.groups) or original(self))
    case = CASES["cnn"]  # one ungrouped convolution, a grouped and a depthwise one
    args_b = _other_batch(case.args)
    G = torchgram.cross_gramian(case.fn, case.params, case.args, args_b, batch_dim=0)
    J_a = jacobian_matrix(case.fn, case.params, *case.args)
    J_b = jacobian_matrix(case.fn, case.params, *args_b)
    assert _close(G, J_a @ J_b.T)
    assert seen == [1, 1]  # both batches' factors of the ungrouped convolution
