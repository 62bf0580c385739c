"""linear, matmul and einsum rules, views of parameters, and the ghost/materialised forms."""

from __future__ import annotations

import pytest
import torch
from rule_check import check_exact, rule_counts
from zoo import cases

from torchgram._factors import (
    Linear,
    dense_gramian,
    ghost_gramian,
    materialised_gramian,
    use_ghost,
)

CASES = cases()


@pytest.mark.parametrize(
    ("equation", "w_shape", "x_shape"),
    [
        ("ti,ij->tj", (4, 5), (2, 4)),
        ("ij,tj->ti", (5, 4), (2, 4)),
        ("i,ij->j", (4, 5), (4,)),
        ("ti,hij->thj", (3, 4, 5), (2, 4)),
        ("ti,j->tij", (5,), (2, 4)),
    ],
)
@pytest.mark.parametrize("batch_dim", [0, None])
def test_einsum_matches_oracle_and_generic(monkeypatch, equation, w_shape, x_shape, batch_dim):
    torch.manual_seed(0)
    params = {"w": torch.randn(*w_shape, dtype=torch.float64)}
    x = torch.randn(3, *x_shape, dtype=torch.float64)

    def fn(params, x):
        return _einsum_loss(equation, x, params["w"])

    check_exact(monkeypatch, fn, params, x, batch_dim=batch_dim)
    if batch_dim == 0:
        assert rule_counts(fn, params, x) == {("einsum", "einsum"): 1}


def _einsum_loss(equation, x, w):
    """The einsum on each sample's own operand (so the equation needs no batch subscript)."""
    per_sample = torch.stack([torch.einsum(equation, xi, w) for xi in x.unbind(0)])
    return torch.tanh(per_sample).pow(2).flatten(1).sum(-1)


@pytest.mark.parametrize("name", ["transformer", "mha_kdim_vdim", "tied_weights", "free_matmul"])
def test_common_layers_take_fast_rules(name) -> None:
    case = CASES[name]
    counts = rule_counts(case.fn, case.params, *case.args)
    assert not [op for op, rule in counts if rule == "generic"], counts


def test_packed_projection_chunks(monkeypatch) -> None:
    torch.manual_seed(0)
    params = {"w": torch.randn(9, 4, dtype=torch.float64), "b": torch.randn(9, dtype=torch.float64)}
    x = torch.randn(3, 2, 4, dtype=torch.float64)

    def fn(params, x):
        q, k, v = torch.nn.functional.linear(x, params["w"], params["b"]).chunk(3, dim=-1)
        wq, wk, wv = params["w"].chunk(3)
        bq, _, _ = params["b"].chunk(3)
        extra = torch.nn.functional.linear(x, wq, bq) * torch.nn.functional.linear(x, wv.T.T)
        return (q * k * v + extra).sum((-1, -2)) + (x @ wk.T).pow(2).sum((-1, -2))

    check_exact(monkeypatch, fn, params, x)
    counts = rule_counts(fn, params, x)
    assert not [op for op, rule in counts if rule == "generic"], counts


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("chunk", [1, 200, 2**30])
def test_ghost_and_materialised_forms_agree(rows, chunk) -> None:
    torch.manual_seed(0)
    A = torch.randn(5, 4, 6, dtype=torch.float64)
    D = torch.randn(rows, 5, 4, 3, dtype=torch.float64)
    expected = dense_gramian(Linear(None, A, D).materialise())
    assert torch.allclose(ghost_gramian(A, D, chunk), expected)
    assert torch.allclose(materialised_gramian(A, D, chunk), expected)
    assert torch.allclose(Linear(None, A, D).gramian(chunk), expected)


@pytest.mark.parametrize(("rows", "tokens"), [(2, 8), (5, 3), (3, 1), (2, 2)])
@pytest.mark.parametrize("ones", [False, True])
def test_one_sample_ghost_through_similarity(monkeypatch, rows, tokens, ones) -> None:
    """With one sample (batch_dim=None) and several rows, ``<D_k, S D_l>`` replaces the
    ``<D, D>`` products when it is cheaper; both give the materialised Gramian."""
    import torchgram._factors as factors

    torch.manual_seed(0)
    A = torch.randn(1, tokens, 6, dtype=torch.float64)
    D = torch.randn(rows, 1, tokens, 4, dtype=torch.float64)
    widened = torch.cat([A, torch.ones(1, tokens, 1, dtype=A.dtype)], dim=-1) if ones else A
    expected = dense_gramian(Linear(None, widened, D).materialise())
    through = factors._through_similarity_cost(rows, tokens, 4) < factors._pairs_cost(
        rows, 1, tokens, 4
    )
    assert through == (rows > 1 and tokens > 1)
    if through:  # the pairwise products must not be built

        def refuse(*args):
            raise AssertionError("pairwise products built")

        monkeypatch.setattr(factors, "_ghost_block", refuse)
    assert torch.allclose(ghost_gramian(A, D, ones=ones), expected)


@pytest.mark.parametrize("columns", [3 * 2**13, 4 * 2**13, 5 * 2**13 + 7])
@pytest.mark.parametrize("rows", [(1, 3), (2, 64), (1, 129)])
def test_dense_gramian_by_column_slices(rows, columns) -> None:
    """Few long rows go by slices of columns; every shape gives the plain product."""
    torch.manual_seed(0)
    g = torch.randn(*rows, columns, dtype=torch.float64)
    flat = g.reshape(-1, columns)
    assert torch.allclose(dense_gramian(g), flat @ flat.T)


def test_dense_gramian_by_column_slices_under_vmap_and_grad() -> None:
    """The sliced product composes: batched over an ensemble, and differentiated."""
    torch.manual_seed(0)
    g = torch.randn(3, 1, 4, 5 * 2**13 + 3, dtype=torch.float64)
    batched = torch.func.vmap(dense_gramian)(g)
    assert torch.allclose(batched, torch.stack([dense_gramian(m) for m in g]))
    ours = torch.func.grad(lambda g: dense_gramian(g).pow(2).sum())(g[0])
    flat = g[0].reshape(4, -1)
    expected = torch.func.grad(lambda f: (f @ f.T).pow(2).sum())(flat)
    assert torch.allclose(ours.reshape(4, -1), expected)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("may_join", [False, True])
def test_bias_factor_sums_the_tokens_when_needed(tokens, may_join) -> None:
    """A bias's per-sample gradients are its cotangents summed over tokens. The sum is put off
    only where the bias may join its weight's ghost Gramian; otherwise it is made at once, so
    that the bias factor does not hold the cotangents themselves."""
    from torchgram._factors import Dense, TokenSum
    from torchgram._ops.linear import _bias_factor
    from torchgram._uses import ParamView

    D = torch.randn(2, 3, tokens, 4, dtype=torch.float64)
    factor = _bias_factor(ParamView(1, torch.zeros(4), None), D, may_join)
    summed = D.sum(dim=2)
    lazy = tokens > 1 and may_join
    assert isinstance(factor, TokenSum if lazy else Dense)
    assert (getattr(factor, "D", None) is D) == lazy
    assert torch.allclose(factor.materialise(), summed, rtol=1e-12)
    assert torch.allclose(factor.gramian(), dense_gramian(summed), rtol=1e-12)
    weights = torch.randn(2, 3, dtype=torch.float64)
    assert torch.allclose(factor.weighted(weights), torch.einsum("kb,kbe->e", weights, summed))


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("scales", [{}, {"beta": 0.5, "alpha": 2.0}])
def test_addmm_as_transformers_conv1d(monkeypatch, batch_dim, scales) -> None:
    """``addmm(b, x.view(-1, d), W)``, transformers' GPT-2 Conv1D: the Linear factor on W.T and
    the summed cotangents for b, exact (and not the generic rule)."""
    f64 = torch.float64
    params = {"w": torch.randn(5, 3, dtype=f64), "b": torch.randn(3, dtype=f64)}
    x = torch.randn(4, 6, 5, dtype=f64)

    def fn(p, x):
        h = torch.addmm(p["b"], x.reshape(-1, x.shape[-1]), p["w"], **scales)
        return torch.tanh(h).reshape(x.shape[0], -1, 3).pow(2).sum((1, 2))

    check_exact(monkeypatch, fn, params, x, batch_dim=batch_dim)
    assert rule_counts(fn, params, x, batch_dim=batch_dim) == {("addmm", "addmm"): 1}


@pytest.mark.parametrize(
    ("a", "d", "ghost"),
    [
        ((32, 17, 192), (1, 32, 17, 768), True),  # the ViT's MLP: fewer plain counts materialised
        ((32, 17, 768), (1, 32, 17, 192), True),
        ((32, 17, 64), (1, 32, 17, 64), False),  # a small map: 0.13 against 0.50 ms
        ((32, 64, 192), (1, 32, 64, 768), False),
        ((64, 8, 192), (1, 64, 8, 768), True),
        ((32, 1, 5), (1, 32, 1, 5), True),  # one token: no per-sample gradient to build
    ],
)
def test_form_by_weighted_cost(a, d, ghost) -> None:
    """The materialised form's multiply-adds count 1.6 times (its slower rate on CPU,
    ``benchmarks/bench_linear.py``): near the crossover the ghost form is taken."""
    assert use_ghost(torch.Size(a), torch.Size(d)) is ghost
    if a == (32, 17, 192):
        assert not use_ghost(torch.Size(a), torch.Size(d), materialised_weight=1)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_linear_with_a_one_dimensional_weight(monkeypatch, batch_dim) -> None:
    """``F.linear(x, w)`` with ``w`` of shape ``[d_in]`` is ``x @ w``: no output dimension, so
    not a Linear factor (whose cotangents end in ``d_out``); the generic rule is exact."""
    torch.manual_seed(0)
    w = torch.randn(6, dtype=torch.float64)
    x = torch.randn(3, 8, 6, dtype=torch.float64)

    def fn(params, x):
        return torch.tanh(torch.nn.functional.linear(x, params["w"])).pow(2).mean(-1)

    check_exact(monkeypatch, fn, {"w": w}, x, batch_dim=batch_dim)
    assert rule_counts(fn, {"w": w}, x) == {("linear", "generic"): 1}


@pytest.mark.parametrize(("cap", "blocks"), [(2**16, 1), (4 * 4 * 64, 3), (1, 36)])
def test_ghost_blocks_capped_by_products(monkeypatch, cap, blocks) -> None:
    """The ghost form runs in blocks of at most ``_BLOCK_PRODUCTS`` products (at least one
    pair of samples), whatever the chunk allows, computing the blocks on and above the
    diagonal only; the Gramian is the materialised one."""
    from torchgram import _factors

    torch.manual_seed(0)
    A = torch.randn(8, 4, 3, dtype=torch.float64)
    D = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    computed = []
    original = _factors._ghost_block

    def spy(*args):
        computed.append(1)
        return original(*args)

    monkeypatch.setattr(_factors, "_BLOCK_PRODUCTS", cap)
    monkeypatch.setattr(_factors, "_ghost_block", spy)
    G = ghost_gramian(A, D, chunk_bytes=2**30)
    assert len(computed) == blocks  # b samples a block: (8 / b) (8 / b + 1) / 2 blocks
    assert torch.allclose(G, materialised_gramian(A, D), rtol=1e-12, atol=1e-12)


def test_ghost_blocks_of_even_sizes(monkeypatch) -> None:
    """A cap allowing 7 of 8 samples a block gives two blocks of 4, not 7 and 1 (a block of
    one sample ran the whole Gramian about 1.2x slower for 16 samples of 17 tokens)."""
    from torchgram import _factors

    torch.manual_seed(0)
    A = torch.randn(8, 4, 3, dtype=torch.float64)
    D = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    sizes = []
    original = _factors._ghost_block

    def spy(similarity, D_i, D_j):
        sizes.append((D_i.shape[1], D_j.shape[1]))
        return original(similarity, D_i, D_j)

    monkeypatch.setattr(_factors, "_BLOCK_PRODUCTS", 4 * 16 * 7 * 7)  # 7 samples a block
    monkeypatch.setattr(_factors, "_ghost_block", spy)
    G = ghost_gramian(A, D, chunk_bytes=2**30)
    assert sizes == [(4, 4), (4, 4), (4, 4)]
    assert torch.allclose(G, materialised_gramian(A, D), rtol=1e-12, atol=1e-12)
