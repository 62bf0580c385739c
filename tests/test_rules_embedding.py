"""The embedding rule: padding rows excluded, and exact cross terms with a tied output head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import flat_gramian
from rule_check import check_exact, rule_counts
from torch.func import grad, vmap

import torchgram
from torchgram._ops.embedding import Embedding

TOKENS = torch.tensor([[1, 2, 0, 3, 3], [0, 0, 5, 6, 1], [2, 2, 2, 4, 0]])


def _table():
    torch.manual_seed(0)
    return {"table": torch.randn(7, 4, dtype=torch.float64)}


@pytest.mark.parametrize("padding_idx", [None, 0, 2])
@pytest.mark.parametrize("batch_dim", [0, None])
def test_embedding_matches_oracle_and_generic(monkeypatch, padding_idx, batch_dim) -> None:
    def fn(params, tokens):
        h = F.embedding(tokens, params["table"], padding_idx=padding_idx)
        return torch.tanh(h).pow(2).sum((-1, -2))

    check_exact(monkeypatch, fn, _table(), TOKENS, batch_dim=batch_dim)
    assert rule_counts(fn, _table(), TOKENS) == {("embedding", "embedding"): 1}


@pytest.mark.parametrize("rows", [1, 2])
def test_tied_output_head(monkeypatch, rows) -> None:
    def fn(params, tokens):
        h = torch.tanh(F.embedding(tokens, params["table"], padding_idx=0))
        logits = F.linear(h, params["table"])  # [B, T, V]: the same table as the output head
        losses = logits.log_softmax(-1)[..., :rows].sum(-2)  # [B, rows]
        return losses.squeeze(-1)

    check_exact(monkeypatch, fn, _table(), TOKENS)


@pytest.mark.parametrize("call", ["functional", "module", "builtin"])
def test_scale_grad_by_freq_is_refused_with_samples(monkeypatch, call) -> None:
    """The batch's counts scale each row's gradient: refused with batch_dim, exact without."""
    module = torch.nn.Embedding(7, 4, scale_grad_by_freq=True).double()

    def fn(params, tokens):
        table = params["table"]
        if call == "functional":
            h = F.embedding(tokens, table, scale_grad_by_freq=True)
        elif call == "module":
            h = torch.func.functional_call(module, {"weight": table}, (tokens,))
        else:
            h = torch.embedding(table, tokens, -1, True, False)
        return torch.tanh(h).pow(2).sum((-1, -2))

    with pytest.raises(ValueError, match=r"^gramian\(fn, batch_dim=0\): fn calls embedding with"):
        torchgram.gramian(fn, _table(), TOKENS, batch_dim=0)
    check_exact(monkeypatch, lambda p, t: fn(p, t)[:2], _table(), TOKENS, batch_dim=None)


@pytest.mark.parametrize("chunk", [2**30, 100, 1])
@pytest.mark.parametrize("lookups", [1, 2])
@pytest.mark.parametrize("rows", [1, 2])
def test_tied_head_adds_lookups_into_its_gradient_blocks(monkeypatch, chunk, lookups, rows):
    """A tied head whose materialised form is the cheaper: the lookups (one or two, one with a
    padding index) are added into each block of the head's per-sample gradients (blocks of 4,
    then of one row of the table, with smaller chunks). With two rows per sample the two
    factors are not joined, as before."""
    import torchgram._assemble as assemble

    taken: list[bool] = []
    tied = assemble._tied_gramian

    def spy(group, chunk_bytes):  # type: ignore[no-untyped-def]
        G = tied(group, chunk_bytes)
        taken.append(G is not None)
        return G

    monkeypatch.setattr(assemble, "_tied_gramian", spy)

    def fn(params, tokens):
        h = torch.tanh(F.embedding(tokens, params["table"], padding_idx=0))
        if lookups == 2:
            h = h + F.embedding(tokens.flip(-1), params["table"]).sin()
        logits = F.linear(h, params["table"])  # [B, T, V]
        return logits.log_softmax(-1)[..., :rows].sum(-2).squeeze(-1)

    check_exact(monkeypatch, fn, _table(), TOKENS, max_chunk_bytes=chunk)
    assert taken[0] == (rows == 1), taken  # then the generic rule's run, which it compares


def test_tied_head_with_an_empty_lookup(monkeypatch) -> None:
    """A second lookup of the table with no tokens adds nothing."""

    def fn(params, tokens, none):
        h = torch.tanh(F.embedding(tokens, params["table"]))
        lookup = F.embedding(none, params["table"]).cos().sum((-1, -2))
        return F.linear(h, params["table"]).log_softmax(-1)[..., 0].sum(-1) + lookup

    check_exact(monkeypatch, fn, _table(), TOKENS, TOKENS[:, :0])


def test_tied_head_under_transforms() -> None:
    """The tied head's Gramian over an ensemble of tables and over batches of tokens (vmapped
    tokens take the one-hot join: the lookups' blocks need their values on the host), and
    differentiated."""

    def fn(params, tokens):
        h = torch.tanh(F.embedding(tokens, params["table"], padding_idx=0))
        return F.linear(h, params["table"]).log_softmax(-1)[..., 0].sum(-1)

    tables = torch.randn(2, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    transform = torchgram.gramian_of(fn, batch_dim=0)
    ensemble = vmap(transform, in_dims=({"table": 0}, None))({"table": tables}, TOKENS)
    batches = torch.stack([TOKENS, TOKENS.flip(-1)])
    over_tokens = vmap(transform, in_dims=(None, 0))({"table": tables[0]}, batches)
    for i in range(2):
        expected = flat_gramian(fn, {"table": tables[i]}, TOKENS)
        assert torch.allclose(ensemble[i], expected, rtol=1e-10)
        expected = flat_gramian(fn, {"table": tables[0]}, batches[i])
        assert torch.allclose(over_tokens[i], expected, rtol=1e-10)
    ours = grad(lambda p: transform(p, TOKENS).trace())({"table": tables[0]})
    oracle = grad(lambda p: flat_gramian(fn, p, TOKENS).trace())({"table": tables[0]})
    assert torch.allclose(ours["table"], oracle["table"], rtol=1e-9)


def test_large_table_under_vmapped_tokens() -> None:
    """A table large enough for the compact form, whose distinct tokens cannot be found under
    vmap: the ghost form then, exact."""
    table = {"table": torch.randn(100_000, 4, dtype=torch.float64)}

    def fn(params, tokens):
        return torch.tanh(F.embedding(tokens, params["table"])).pow(2).sum((-1, -2))

    batches = torch.stack([TOKENS, TOKENS.flip(-1)])
    G = vmap(torchgram.gramian_of(fn, batch_dim=0), in_dims=(None, 0))(table, batches)
    for i in range(2):
        assert torch.allclose(G[i], flat_gramian(fn, table, batches[i]), rtol=1e-10)


@pytest.mark.parametrize("rows", [7, 100_000])
def test_no_tokens(rows) -> None:
    """Sequences of length 0: a zero Gramian in either form."""
    factor = Embedding(None, torch.zeros(3, 0, dtype=torch.long), torch.zeros(1, 3, 0, 4), rows)
    assert torch.equal(factor.gramian(), torch.zeros(3, 3))


def test_ghost_and_compact_forms_agree() -> None:
    torch.manual_seed(0)
    D = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    factor = Embedding(None, TOKENS, D, 7)
    g = factor.materialise().reshape(6, -1)
    for chunk, blocks in ((2**30, 1), (2 * 3 * 4 * 8 * 2, 4), (1, 7)):
        compact = list(factor._compact_blocks(chunk))  # 7 distinct tokens, 2 per block
        assert len(compact) == blocks
        assert sum(c.reshape(6, -1) @ c.reshape(6, -1).T for c in compact).allclose(g @ g.T)
        # each block the gradients on its tokens (the distinct tokens in sorted order)
        whole = torch.cat(compact, dim=2)
        assert torch.equal(whole, factor.materialise()[:, :, TOKENS.unique()])
    # a big table makes the compact form the cheaper one, a small one the ghost form
    big = Embedding(None, TOKENS, D, 10_000)
    for f in (factor, big):
        assert torch.allclose(f.gramian(), g @ g.T)
        assert torch.allclose(f.gramian(chunk_bytes=1), g @ g.T)
