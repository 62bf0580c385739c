"""The batched run (fn on the whole batch, without vmap): taken where every tap holds the samples
on one dimension (and, with uses that vmap taps on their parameters, where that pays), exact
there, and made again under vmap everywhere else."""

from __future__ import annotations

import functools

import optree
import pytest
import torch
import torch.nn.functional as F
from oracle import flat_gramian, jacobian_matrix
from torch.func import jacrev

import torchgram
from torchgram import _run
from torchgram._batched import SHARED, as_stacked, sample_dim

D = torch.float64
B, T, DIN, DOUT = 4, 3, 5, 6


@pytest.fixture
def runs(monkeypatch) -> list[str]:
    """Which run gave each result: "batched", or "vmap" (after a batched run that did not fit,
    or none)."""
    taken: list[str] = []
    batched, vmapped = _run.linearise_batched, _run.linearise_vmapped

    def spy_batched(*args):
        result = batched(*args)
        if result is not None:
            taken.append("batched")
        return result

    def spy_vmapped(*args):
        taken.append("vmap")
        return vmapped(*args)

    monkeypatch.setattr(_run, "linearise_batched", spy_batched)
    monkeypatch.setattr(_run, "linearise_vmapped", spy_vmapped)
    return taken


def _params() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(DOUT, DIN, dtype=D),
        "b": torch.randn(DOUT, dtype=D),
        "v": torch.randn(2, DOUT, dtype=D),
    }


def _exact(fn, params, *args, **kwargs) -> None:
    """Two calls of one transform (the batched run is compared with the vmapped one on the
    first, and used alone on the second if they agree), both exact."""
    transform = torchgram.gramian_of(fn, batch_dim=0, **kwargs)
    expected = flat_gramian(fn, params, *args)
    for _ in range(2):
        G = transform(params, *args)
        assert torch.allclose(torchgram.flatten(G), expected, rtol=1e-10, atol=1e-12)


def _mlp(p, x):  # [B, 2]
    return torch.tanh(F.linear(x, p["w"], p["b"])) @ p["v"].T


def _sequence_first(p, x):  # x [T, B, d_in] -> [B, 2]
    return (torch.tanh(F.linear(x, p["w"], p["b"])) @ p["v"].T).sum(0)


def _shared_operand(p, x):  # addcmul reads a constant that no sample owns
    c = torch.linspace(-1, 1, DOUT, dtype=D)
    h = torch.addcmul(F.linear(x, p["w"]), c, p["b"])
    return torch.tanh(h) @ p["v"][0]


def test_batched_run_where_taps_hold_the_samples(runs) -> None:
    p = _params()
    x = torch.randn(B, DIN, dtype=D)
    _exact(_mlp, p, x)
    _exact(_shared_operand, p, x)
    assert runs == ["vmap", "batched", "batched"] * 2


# Ops whose taps go on their parameter arguments under vmap (norms' affine parameters, broadcast
# scales and shifts): in the batched run they are tapped on their outputs, like any other use,
# where fn calls attention (whose fused kernels vmap cannot batch).
def _attend(h):  # self-attention over the last-but-one dimension (a single token for [B, d])
    tokens = h if h.dim() == 3 else h.unsqueeze(-2)
    mixed = F.scaled_dot_product_attention(tokens, tokens, tokens)
    return mixed if h.dim() == 3 else mixed.squeeze(-2)


def _layer_normed(p, x, attend=_attend):
    h = F.layer_norm(attend(F.linear(x, p["w"])), (DOUT,), p["b"], p["v"][1])
    return h @ p["v"][0]


def _group_normed(p, x):  # x [B, T, d_in] -> channels [B, d_out, T]
    h = _attend(F.linear(x, p["w"])).transpose(1, 2)
    return F.group_norm(h, 2, p["b"], p["v"][1]).sum(2) @ p["v"][0]


def _rms_normed(p, x):
    return F.rms_norm(_attend(torch.tanh(F.linear(x, p["w"]))), (DOUT,), p["b"]) @ p["v"][0]


def _scaled_and_shifted(p, x):  # broadcast mul, add, sub and both sides of a division
    h = torch.tanh(_attend(F.linear(x, p["w"])) * p["b"] + p["v"][1]) - p["b"]
    return (h / p["b"] + p["v"][1] / (h + 3)) @ p["v"][0]


@pytest.mark.parametrize("fn", [_layer_normed, _group_normed, _rms_normed, _scaled_and_shifted])
def test_batched_run_with_parameters_tapped_under_vmap(runs, fn) -> None:
    p = _params()
    x = torch.randn(B, T, DIN, dtype=D) if fn is _group_normed else torch.randn(B, DIN, dtype=D)
    _exact(fn, p, x)
    assert runs == ["vmap", "batched", "batched"]


_LAYER_NORMS = {
    "weight-and-bias": lambda h, p: F.layer_norm(h, (DOUT,), p["b"], p["v"][1]),
    "weight": lambda h, p: F.layer_norm(h, (DOUT,), p["b"], eps=1e-3),
    "bias": lambda h, p: F.layer_norm(h, (DOUT,), None, p["v"][1]),
    "two-dims": lambda h, p: F.layer_norm(h, (T, DOUT), p["v"][:, None].expand(2, T, DOUT)[0]),
}


@pytest.mark.parametrize("variant", sorted(_LAYER_NORMS))
def test_layer_norm_rule_in_the_batched_run(runs, monkeypatch, variant) -> None:
    """Tapped on its output (the batched run), layer_norm's affine parameters take the closed
    form (``_ops.norm``), exact against the oracle."""
    from torchgram import _ops

    rule = _ops.RULES["layer_norm"]
    taken: list[bool] = []

    def spy(*args):
        found = rule(*args)
        taken.append(found is not None)
        return found

    monkeypatch.setitem(_ops.RULES, "layer_norm", spy)
    norm = _LAYER_NORMS[variant]

    def fn(p, x):  # x [B, T, d_in]
        return norm(_attend(F.linear(x, p["w"])), p).pow(2).sum((1, 2))

    _exact(fn, _params(), torch.randn(B, T, DIN, dtype=D))
    assert runs == ["vmap", "batched", "batched"]
    assert taken and all(taken)


def _normed_twice(p, x):  # x [B, 16, d_in]: the norm's output holds far more than its weights
    h = F.group_norm(_attend(F.linear(x, p["w"])).transpose(1, 2), 2, p["b"], p["v"][1])
    return (h * p["v"][0][:, None]).sum((1, 2))


def test_vmap_where_the_batched_run_would_hold_much_more(runs) -> None:
    p = _params()
    _exact(_normed_twice, p, torch.randn(B, 16, DIN, dtype=D))
    assert runs == ["vmap", "vmap"]


def test_batched_where_the_inputs_dwarf_the_extra_cotangents(runs) -> None:
    torch.manual_seed(1)
    p = {**_params(), "w": torch.randn(DOUT, 200, dtype=D)}  # the records: 200 per token
    _exact(_normed_twice, p, torch.randn(B, 16, 200, dtype=D))
    assert runs == ["vmap", "batched", "batched"]


def test_batched_for_norms_without_attention(runs) -> None:  # within the memory bound
    p = _params()
    _exact(functools.partial(_layer_normed, attend=lambda h: h), p, torch.randn(B, DIN, dtype=D))
    assert runs == ["vmap", "batched", "batched"]


def test_samples_on_another_dimension(runs) -> None:
    p, x = _params(), torch.randn(T, B, DIN, dtype=D)
    _exact(_sequence_first, p, x, in_dims=1)
    assert runs == ["vmap", "batched", "batched"]


def _parameter_only(p, x):  # a use of the parameters that no sample owns: one tap per sample
    return torch.tanh(x @ (p["w"].T @ p["w"])) @ p["w"].T @ p["v"][0]


def _merged(p, x):  # x [B, T, d_in]: samples and tokens merged before the linear map
    h = F.linear(x.reshape(-1, DIN), p["w"], p["b"]).reshape(x.shape[0], T, DOUT)
    return torch.tanh(h).sum(1) @ p["v"][0]


def _per_sample_loop(p, x):  # one use per sample: a different tape on the batch
    return torch.stack([torch.tanh(xi @ p["w"].T) @ p["v"][0] for xi in x.unbind(0)])


@pytest.mark.parametrize("fn", [_parameter_only, _per_sample_loop])
def test_vmap_where_the_batched_run_does_not_fit(runs, fn) -> None:
    _exact(fn, _params(), torch.randn(B, DIN, dtype=D))
    assert runs == ["vmap", "vmap"]


def _positions(p, x):  # x [B, T, d_in]: a position embedding of ids that no sample owns
    positions = F.embedding(torch.arange(T)[None], p["w"].T[:T])  # [1, T, d_out]
    return torch.tanh(F.linear(x, p["w"]) + positions).sum(1) @ p["v"][0]


def _merged_inner(p, x):  # samples merged inside a dimension, not as its outer factor
    h = F.linear(x.transpose(0, 1).reshape(-1, DIN), p["w"], p["b"]).reshape(T, x.shape[0], DOUT)
    return torch.tanh(h).sum(0) @ p["v"][0]


@pytest.mark.parametrize("fn", [_merged, _positions])
def test_batched_with_merged_samples_and_shared_outputs(runs, fn) -> None:
    """Samples merged with the tokens as their outer factor (``x.reshape(-1, d)``, as
    transformers' GPT-2 does), and an output that no sample owns (position embeddings, expanded
    to the batch so that its tap holds each sample's cotangent): the batched run, exact."""
    _exact(fn, _params(), torch.randn(B, T, DIN, dtype=D))
    assert runs == ["vmap", "batched", "batched"]


def test_samples_merged_as_the_inner_factor_are_batched(runs) -> None:
    """``[T * B, d]`` of ``[T, B, d]``: the shapes alone would take the samples for the outer
    factor; the vmapped run's records tell the first call they are the inner one."""
    _exact(_merged_inner, _params(), torch.randn(B, T, DIN, dtype=D))
    assert runs == ["vmap", "batched", "batched"]


def _merged_shuffled(p, x):  # samples merged inside a dimension, in neither factor's order
    h = F.linear(x.transpose(0, 1).reshape(-1, DIN).flip(0), p["w"], p["b"]).flip(0)
    return torch.tanh(h.reshape(T, x.shape[0], DOUT)).sum(0) @ p["v"][0]


def test_samples_merged_in_another_order_are_not_batched(runs) -> None:
    """Neither layout gives the vmapped run's records: the batched run's rows are not the
    samples, its Gramian differs, and the vmapped run is kept."""
    _exact(_merged_shuffled, _params(), torch.randn(B, T, DIN, dtype=D))
    assert runs == ["vmap", "batched", "vmap"]


class _ClassToken(torch.nn.Module):
    """A ViT's class token expanded to the batch, then multi-head attention (batch first,
    whose output projection sees ``[T * B, d]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = torch.nn.Parameter(torch.randn(1, 1, DIN))
        self.attention = torch.nn.MultiheadAttention(DIN, 1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.attention(h, h, h, need_weights=False)[0][:, 0].pow(2).sum(-1)


def _class_token(p, x):  # a parameter view expanded to the batch size
    h = F.linear(x, p["w"]).unsqueeze(1)
    token = p["b"].view(1, 1, DOUT).expand(x.shape[0], -1, -1)
    return torch.tanh(torch.cat([token, h], 1)).sum(1) @ p["v"][0]


def test_class_token_and_multi_head_attention_are_batched(runs) -> None:
    """A parameter view expanded to the batch is the same view for every sample: the rules
    replay each sample with one slice of it."""
    _exact(_class_token, _params(), torch.randn(B, DIN, dtype=D))
    torch.manual_seed(0)
    model = _ClassToken().double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(params, x):
        return torch.func.functional_call(model, params, (x,))

    _exact(fn, params, torch.randn(B, T, DIN, dtype=D))
    assert runs == ["vmap", "batched", "batched"] * 2


def test_vmap_for_aux_and_unchecked_samples(runs) -> None:
    p, x = _params(), torch.randn(B, DIN, dtype=D)
    with_aux = lambda p, x: (_mlp(p, x), _mlp(p, x).sum())
    torchgram.gramian_of(with_aux, batch_dim=0, has_aux=True)(p, x)
    torchgram.gramian_of(_mlp, batch_dim=0, check_samples=False)(p, x)
    assert runs == ["vmap"] * 2


def test_dropout_takes_the_batched_run_checked_under_the_same_draws(runs) -> None:
    """The vmapped and the batched run start from the same generator state, and dropout draws
    the same mask in both: checked on the first call, the batched run is used on later ones.
    Each call's Gramian is that of fn with the mask a plain call draws from that state."""
    p = _params()
    dropped = lambda p, x: _mlp(p, F.dropout(x, 0.5, training=True))
    transform = torchgram.gramian_of(dropped, batch_dim=0)
    for seed in (1, 2):
        x = torch.randn(B, DIN, dtype=D)
        torch.manual_seed(seed)
        G = transform(p, x)
        after = torch.rand(())
        torch.manual_seed(seed)
        J = torch.cat([j.reshape(B * 2, -1) for j in jacrev(dropped)(p, x).values()], dim=1)
        assert torch.equal(after, torch.rand(()))  # the generator advanced as by one run of fn
        assert torch.allclose(torchgram.flatten(G), J @ J.T, rtol=1e-10)
    assert runs == ["vmap", "batched", "batched"]


def test_a_batched_run_that_did_not_fit_is_not_tried_again() -> None:
    calls = [0]

    def fn(p, x):
        calls[0] += 1
        return _parameter_only(p, x)

    transform = torchgram.gramian_of(fn, batch_dim=0)
    p, x = _params(), torch.randn(B, DIN, dtype=D)
    transform(p, x)
    first = calls[0]  # probe, batched run, vmapped run, sample check
    transform(p, x)
    assert (first, calls[0] - first) == (4, 1)


def test_the_sample_check_refuses_mixing_in_the_batched_run(runs) -> None:
    def mixes(p, x):
        out = _mlp(p, x)
        return out - out.mean(0, keepdim=True)

    with pytest.raises(ValueError, match="does not treat samples independently: on the whole"):
        torchgram.gramian_of(mixes, batch_dim=0)(_params(), torch.randn(B, DIN, dtype=D))
    assert runs == ["vmap", "batched"]  # refused when the two are compared


def _reordered(p, x):  # the samples reversed inside fn, and back: rows are not the samples
    return torch.tanh(F.linear(x.flip(0), p["w"], p["b"])).flip(0) @ p["v"].T


def test_a_batched_run_whose_rows_are_not_the_samples_is_replaced(runs) -> None:
    """Its Gramian differs from the vmapped run's (or cannot be computed): the vmapped one is
    returned, and the transform does not use the batched run on that signature again."""
    _two_batches(_reordered, _reordered)
    assert runs == ["vmap", "batched", "vmap"]


def _two_batches(fn, oracle_fn) -> None:
    """One transform called on two batches of the same shapes, exact on both."""
    transform = torchgram.gramian_of(fn, batch_dim=0)
    p = _params()
    for _ in range(2):
        x = torch.randn(B, DIN, dtype=D)
        G = transform(p, x)
        assert torch.allclose(torchgram.flatten(G), flat_gramian(oracle_fn, p, x), rtol=1e-10)


def test_a_verified_batched_run_is_used_without_the_vmapped_one(runs) -> None:
    calls = [0]

    def fn(p, x):
        calls[0] += 1
        return _mlp(p, x)

    _two_batches(fn, _mlp)
    assert runs == ["vmap", "batched", "batched"]
    assert calls[0] == 4  # probe, batched, vmapped; then the batched run alone


def test_randomness_keeps_the_vmapped_run_after_a_passed_check(runs) -> None:
    noisy = [False]

    def fn(p, x):
        return _mlp(p, x + torch.randn(DIN, dtype=D) if noisy[0] else x)

    transform = torchgram.gramian_of(fn, batch_dim=0)
    p, x = _params(), torch.randn(B, DIN, dtype=D)
    transform(p, x)  # checked and verified
    runs.clear()
    noisy[0] = True
    transform(p, x)
    assert runs == ["vmap"]  # each sample draws its own noise


@pytest.mark.parametrize("fn", [_mlp, _layer_normed, _scaled_and_shifted])
def test_jd_grad_from_the_batched_run(runs, fn) -> None:
    """The JD direction from the batched run's tape (no second backward) is ``Jᵀ w`` with the
    weights of its Gramian, on the first call (after the comparison with the vmapped run) and on
    the remembered one (the batched run alone)."""
    p = _params()
    x = torch.randn(B, DIN, dtype=D)
    J = jacobian_matrix(fn, p, x)
    expected_weights = torchgram.weightings.upgrad(J @ J.T)
    expected = expected_weights @ J
    step = torchgram.jd_grad(fn, torchgram.weightings.upgrad, batch_dim=0)
    for _ in range(2):
        direction = step(p, x)
        flat = torch.cat([leaf.reshape(-1) for leaf in optree.tree_leaves(direction)])
        assert torch.allclose(flat, expected, rtol=1e-8, atol=1e-10)
    assert runs == ["vmap", "batched", "batched"]


def test_sample_dim_and_stacking() -> None:
    assert sample_dim(torch.Size([4, 3]), torch.Size([1, 3]), 4) == 0
    assert sample_dim(torch.Size([3, 4]), torch.Size([3, 1]), 4) == 1
    assert sample_dim(torch.Size([3, 5]), torch.Size([3, 5]), 4) == SHARED
    assert sample_dim(torch.Size([12, 5]), torch.Size([3, 5]), 4) == 0  # merged, outer
    assert sample_dim(torch.Size([13, 5]), torch.Size([3, 5]), 4) is None
    assert sample_dim(torch.Size([4, 4]), torch.Size([1, 1]), 4) is None
    assert sample_dim(torch.Size([4]), torch.Size([1, 1]), 4) is None
    x = torch.randn(3, 4, 5)  # samples at dim 1
    stacked = as_stacked(x, 1, 0, 4)
    assert stacked.shape == (4, 3, 1, 5)
    assert torch.equal(stacked[2, :, 0], x[:, 2])
    c = torch.randn(2, 3, 4)  # [K, *shape], samples at dim 1 of the shape
    assert torch.equal(as_stacked(c, 1, 1, 4)[:, 3, :, 0], c[:, :, 3])
    merged = torch.randn(2, 12, 5)  # [K, B * 3, 5]: sample-major rows
    assert torch.equal(as_stacked(merged, 0, 1, 4), merged.view(2, 4, 3, 5))
    shared = as_stacked(torch.randn(3, 5), SHARED, 0, 4)
    assert shared.shape == (4, 3, 5) and torch.equal(shared[0], shared[3])


def test_the_gramian_of_the_first_call_is_differentiable() -> None:
    """The first call compares the batched run with the vmapped one without grad; the Gramian it
    returns still has its graph to parameters that require grad (as every later call's does)."""
    params = {k: v.requires_grad_() for k, v in _params().items()}
    x = torch.randn(B, DIN, dtype=D)
    transform = torchgram.gramian_of(_mlp, batch_dim=0)

    def flat(params):
        return torchgram.flatten(torchgram.gramian(_mlp, params, x, batch_dim=0))

    expected = torch.func.jacrev(lambda p: flat(p).pow(2).sum())(params)
    for _ in range(2):
        G = torchgram.flatten(transform(params, x))
        grads = torch.autograd.grad(G.pow(2).sum(), list(params.values()))
        for g, name in zip(grads, params, strict=True):
            assert torch.allclose(g, expected[name], rtol=1e-9)
