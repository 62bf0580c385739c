"""Exactness of gramian / gramian_of against the jacrev oracle, on a zoo of models and shapes."""

from __future__ import annotations

import pytest
import torch
from oracle import flat_gramian, row_by_row_gramian
from zoo import cases

import torchgram
from torchgram import flatten

CASES = cases()


def assert_close(G: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-10) -> None:
    scale = reference.abs().max().clamp(min=1e-30)
    assert G.shape == reference.shape
    assert float((G - reference).abs().max() / scale) < rtol


@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_matches_oracle(name: str) -> None:
    case = CASES[name]
    G = torchgram.gramian(
        case.fn, case.params, *case.args, batch_dim=case.batch_dim, in_dims=case.in_dims
    )
    assert G.dtype == torch.float64
    assert_close(flatten(G), flat_gramian(case.fn, case.params, *case.args))


@pytest.mark.parametrize("name", ["mlp", "transformer", "tied_weights", "gru"])
def test_zoo_without_batch_dim_matches_oracle(name: str) -> None:
    case = CASES[name]
    G = torchgram.gramian(case.fn, case.params, *case.args)
    assert_close(G, flat_gramian(case.fn, case.params, *case.args))


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_float32_agrees_with_float64(name: str) -> None:
    case = CASES[name]
    to32 = lambda t: t.float() if t.is_floating_point() else t
    params = {k: to32(v) for k, v in case.params.items()}
    args = tuple(to32(a) for a in case.args)
    G32 = torchgram.gramian(case.fn, params, *args, batch_dim=0)
    assert G32.dtype == torch.float32
    assert_close(G32.double(), flat_gramian(case.fn, case.params, *case.args), rtol=1e-4)


def _mlp():
    torch.manual_seed(1)
    params = {
        "w1": torch.randn(4, 6, dtype=torch.float64),
        "b1": torch.randn(6, dtype=torch.float64),
        "w2": torch.randn(6, 6, dtype=torch.float64),
    }
    x = torch.randn(5, 4, dtype=torch.float64)
    return params, x


def _features(params, x):
    h = torch.tanh(x @ params["w1"] + params["b1"])
    return torch.tanh(h @ params["w2"])  # [B, 6]


def _scalar(params, x):
    return _features(params, x).pow(2).sum()


def _rank1(params, x):
    return _features(params, x).pow(2).sum(-1)


def _rank2(params, x):
    return _features(params, x)[:, :3]


def _rank3(params, x):
    return _features(params, x).reshape(-1, 2, 3)


def test_rank_0_output_gives_squared_gradient_norm() -> None:
    params, x = _mlp()
    G = torchgram.gramian(_scalar, params, x)
    assert G.shape == ()
    assert_close(G.reshape(1, 1), flat_gramian(_scalar, params, x))


@pytest.mark.parametrize(
    ("fn", "shape"), [(_rank1, (5, 5)), (_rank2, (5, 3, 3, 5)), (_rank3, (5, 2, 3, 3, 2, 5))]
)
@pytest.mark.parametrize("batch_dim", [0, None])
def test_generalized_gramian_layout(fn, shape, batch_dim) -> None:
    params, x = _mlp()
    G = torchgram.gramian(fn, params, x, batch_dim=batch_dim)
    assert G.shape == shape
    reference = flat_gramian(fn, params, x)
    assert_close(flatten(G), reference)
    out = fn(params, x)
    first, second = (0,) * out.dim(), (1,) + (0,) * (out.dim() - 1)
    # G[s, reversed(s')] = <grad out[s], grad out[s']>
    assert torch.isclose(G[first + tuple(reversed(second))], reference[0, out[0].numel()])


def test_batch_dim_1() -> None:
    params, x = _mlp()

    def transposed(params, x):
        return _rank2(params, x).T  # [3, B]

    G = torchgram.gramian(transposed, params, x, batch_dim=1)
    assert G.shape == (3, 5, 5, 3)
    assert_close(flatten(G), flat_gramian(transposed, params, x))


def test_negative_batch_dim() -> None:
    params, x = _mlp()
    G = torchgram.gramian(_rank1, params, x, batch_dim=-1)
    assert_close(G, flat_gramian(_rank1, params, x))


def test_in_dims_with_unbatched_and_non_tensor_arguments() -> None:
    params, x = _mlp()
    xt = x.T.contiguous()  # samples on dim 1
    offset = torch.randn(4, dtype=torch.float64)

    def fn(params, xt, offset, power):
        return _rank1(params, xt.T + offset) ** power

    G = torchgram.gramian(fn, params, xt, offset, 2, batch_dim=0, in_dims=(None, 1, None, None))
    assert_close(G, flat_gramian(fn, params, xt, offset, 2))


def test_in_dims_pytree_prefix() -> None:
    params, x = _mlp()
    target = torch.randn(5, dtype=torch.float64)

    def fn(params, batch):
        return (_rank1(params, batch["x"]) - batch["y"]) ** 2

    batch = {"x": x, "y": target}
    G = torchgram.gramian(fn, params, batch, batch_dim=0, in_dims=(None, {"x": 0, "y": 0}))
    assert_close(G, flat_gramian(fn, params, batch))


def test_gramian_of_argnums_and_has_aux() -> None:
    params, x = _mlp()

    def fn(x, params):
        out = _rank1(params, x)
        return out, {"mean": out.mean(), "note": "kept"}

    G, aux = torchgram.gramian_of(fn, argnums=1, batch_dim=0, has_aux=True)(x, params)
    assert_close(G, flat_gramian(lambda p, x: fn(x, p)[0], params, x))
    assert aux["note"] == "kept"
    assert aux["mean"].shape == (5,)  # per-sample scalar, stacked over samples
    assert torch.allclose(aux["mean"], _rank1(params, x))


def test_aux_keeps_batch_of_one_at_batch_dim() -> None:
    params, x = _mlp()

    def fn(params, x):
        return _rank1(params, x), _features(params, x)

    G, features = torchgram.gramian(fn, params, x, batch_dim=0, has_aux=True)
    assert features.shape == (5, 6)
    assert torch.allclose(features, _features(params, x))


def test_unused_parameter_contributes_zero() -> None:
    params, x = _mlp()
    extra = dict(params, unused=torch.randn(7, dtype=torch.float64))
    G = torchgram.gramian(_rank1, extra, x, batch_dim=0)
    assert_close(G, flat_gramian(_rank1, params, x))


def test_no_parameter_used_gives_zero_gramian() -> None:
    _, x = _mlp()
    G = torchgram.gramian(lambda p, x: x.sum(-1), {"w": torch.ones(2)}, x, batch_dim=0)
    assert torch.equal(G, torch.zeros(5, 5, dtype=torch.float64))


def test_parameter_view_with_repeated_elements() -> None:
    params = {"w": torch.randn(3, dtype=torch.float64)}
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def fn(params, x):
        tiled = params["w"].expand(2, 3)  # the same elements twice
        return (x * tiled).sum((-1, -2)) + (x @ params["w"].unsqueeze(-1)).pow(2).sum((-1, -2))

    G = torchgram.gramian(fn, params, x, batch_dim=0)
    assert_close(G, flat_gramian(fn, params, x))


def test_transposed_and_chunked_uses_of_one_leaf() -> None:
    w = torch.randn(6, 4, dtype=torch.float64)
    x = torch.randn(3, 2, 4, dtype=torch.float64)

    def fn(params, x):
        a, b = params["w"].chunk(2)
        h = torch.nn.functional.linear(x, a) + torch.nn.functional.linear(x, b)  # [.., 3]
        back = h @ params["w"][:3]  # a transposed use of the first chunk: [.., 4]
        return (back * x).sum((-1, -2)) + (x @ params["w"].T).pow(2).sum((-1, -2))

    for batch_dim in (0, None):
        G = torchgram.gramian(fn, {"w": w}, x, batch_dim=batch_dim)
        assert_close(flatten(G), flat_gramian(fn, {"w": w}, x))


@pytest.mark.parametrize(
    "identity",
    [
        lambda w: w.conj(),
        lambda w: torch.nn.functional.dropout(w, 0.5, training=False),
        lambda w: torch.nn.functional.dropout(w, 0.0),
    ],
    ids=["conj", "dropout-eval", "dropout-p0"],
)
def test_ops_that_return_the_parameter_itself(identity) -> None:
    """An op that returns its parameter argument itself (conj of a real tensor, dropout that
    drops nothing) is no use of it: the parameter is used where its result is."""
    w = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)

    def fn(params, x):
        return torch.tanh(x @ identity(params["w"]).T).pow(2).sum(-1)

    expected = flat_gramian(fn, {"w": w}, x)
    for batch_dim in (0, None):
        transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
        for _ in range(2):  # the first call and a remembered one (the batched run)
            assert_close(flatten(transform({"w": w}, x)), expected)
    out, vjp_fn, _ = torchgram.vjp_and_gramian(fn, {"w": w}, x, batch_dim=0)
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad(fn({"w": w.requires_grad_()}, x), w, weights)
    assert torch.allclose(vjp_fn(weights)["w"], grad, rtol=1e-10)


OUTPUT_VIEWS = {
    "itself": (lambda w, x: w[0], None),
    "clone": (lambda w, x: w[0].clone(), None),
    "contiguous": (lambda w, x: w.T.contiguous()[1], None),
    "to": (lambda w, x: w[1].to(torch.float64), None),
    "expand": (lambda w, x: w[0, :2].expand(3, 2), None),
    "expanded-per-sample": (lambda w, x: w[0, :1].expand(x.shape[0]), 0),
    "reshaped-per-sample": (lambda w, x: w[:1, :1].reshape(1).expand(x.shape[0], 1), 0),
}


@pytest.mark.parametrize("name", list(OUTPUT_VIEWS))
def test_output_that_is_a_parameter_view(name) -> None:
    """fn's output is a parameter (or a view of one) that no op uses: each output element is
    one parameter element (the Gramian counts how many it shares), not zero. vjp_fn and
    jd_grad give the weights at those elements."""
    view, batch_dim = OUTPUT_VIEWS[name]
    w = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    fn = lambda params, x: view(params["w"], x)
    expected = flat_gramian(fn, {"w": w}, x)
    assert expected.abs().sum() > 0
    assert_close(flatten(torchgram.gramian(fn, {"w": w}, x, batch_dim=batch_dim)), expected)
    out, vjp_fn, _ = torchgram.vjp_and_gramian(fn, {"w": w}, x, batch_dim=batch_dim)
    weights = torch.randn_like(out)
    reference = torch.func.vjp(lambda w: fn({"w": w}, x), w)[1](weights)[0]
    assert torch.allclose(vjp_fn(weights)["w"], reference, rtol=1e-10)
    step = torchgram.jd_grad(fn, torchgram.weightings.sum, batch_dim=batch_dim)({"w": w}, x)
    total = torch.func.grad(lambda w: fn({"w": w}, x).sum())(w)
    assert torch.allclose(step["w"], total, rtol=1e-10) and total.abs().sum() > 0


def test_module_called_directly_with_its_own_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = model.double()
    params = dict(model.named_parameters())  # the module's own tensors, no functional_call
    x = torch.randn(5, 4, dtype=torch.float64)
    G = torchgram.gramian(lambda p, x: model(x).squeeze(-1), params, x, batch_dim=0)

    def fn(params, x):
        return torch.func.functional_call(model, params, (x,)).squeeze(-1)

    detached = {k: v.detach() for k, v in params.items()}
    assert_close(G.detach(), flat_gramian(fn, detached, x))


def test_in_dims_play_no_part_without_batch_dim() -> None:
    w = torch.randn(3, dtype=torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64)  # 0-D: no dim 0 to hold samples
    x = torch.randn(5, 3, dtype=torch.float64)

    def fn(w, scale, x):
        return torch.tanh(x @ w) * scale

    G = torchgram.gramian(fn, w, scale, x)
    assert_close(G, flat_gramian(fn, w, scale, x))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_cdist_matches_a_row_by_row_oracle(batch_dim) -> None:
    """torch.cdist's backward under torch.func.vmap is wrong in torch 2.13, so jacrev is no
    oracle there; the Gramian (whose runs never vmap a vjp outside a transform) matches one
    autograd call per output element."""
    torch.manual_seed(0)
    params = {"w": torch.randn(6, 5, dtype=torch.float64)}
    x = torch.randn(3, 4, 5, dtype=torch.float64)

    def fn(p, x):
        h = torch.nn.functional.linear(x, p["w"])
        return torch.cdist(h, 0.5 * h).flatten(1)[:, :3]

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    expected = row_by_row_gramian(fn, params, x)
    for _ in range(2):  # the batched run's first call, then the batched run alone
        G = torchgram.flatten(transform(params, x))
        assert torch.allclose(G, expected, rtol=1e-10, atol=1e-12)


def test_version() -> None:
    assert isinstance(torchgram.__version__, str) and torchgram.__version__[0].isdigit()
