"""The real run and its reverse pass: plain autograd outside torch.func transforms, vjp inside,
the same Gramian either way, and a graph kept only when something outside requires grad."""

from __future__ import annotations

import pytest
import torch
from oracle import flat_gramian
from torch.func import grad, vmap

import torchgram
from torchgram import _per_sample, _reverse, _tape, _whole

D = torch.float64
W = {"w": torch.randn(4, 3, dtype=D), "v": torch.randn(3, 2, dtype=D)}
X = torch.randn(5, 4, dtype=D)


def losses(params, x):
    return torch.tanh(x @ params["w"]) @ params["v"]  # [B, 2]


@pytest.fixture
def paths(monkeypatch) -> list[str]:
    """Which way each run went: "autograd", "vjp" or "batched" (plain autograd on the whole batch,
    without vmap)."""
    taken: list[str] = []
    for module, name, path in [
        (_reverse, "_by_autograd", "autograd"),
        (_reverse, "linearise_made_taps", "autograd"),  # the taps made by the run
        (_whole, "linearise_made_taps", "autograd"),  # the same, before anything is known
        (_reverse, "_by_vjp", "vjp"),
        (_per_sample, "linearise_made_taps", "batched"),
    ]:
        original = getattr(module, name)

        def spy(*args, original=original, path=path, **kwargs):
            taken.append(path)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return taken


@pytest.mark.parametrize("batch_dim", [0, None])
def test_plain_autograd_outside_transforms(paths, batch_dim) -> None:
    G = torchgram.gramian(losses, W, X, batch_dim=batch_dim)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(losses, W, X), rtol=1e-10)
    # with batch_dim, the first call compares the batched run with the vmapped one
    assert paths == (["autograd", "batched"] if batch_dim == 0 else ["autograd"])


def test_vjp_inside_a_transform(paths) -> None:
    stacked = {k: torch.stack([v, 2 * v]) for k, v in W.items()}
    G = vmap(torchgram.gramian_of(losses, batch_dim=0), in_dims=(0, None))(stacked, X)
    for i in range(2):
        member = {k: v[i] for k, v in stacked.items()}
        expected = flat_gramian(losses, member, X)
        assert torch.allclose(torchgram.flatten(G[i]), expected, rtol=1e-10)
    assert paths == ["vjp"]
    paths.clear()
    grad(lambda p: torchgram.flatten(torchgram.gramian(losses, p, X, batch_dim=0)).trace())(W)
    assert paths == ["vjp"]


@pytest.mark.parametrize("batch_dim", [0, None])
def test_nothing_requires_grad_after_a_run_without_outside_gradients(batch_dim) -> None:
    out, vjp_fn, G = torchgram.vjp_and_gramian(losses, W, X, batch_dim=batch_dim)
    aux_fn = lambda p, x: (losses(p, x), {"h": torch.tanh(losses(p, x))})
    _, _, G_aux, aux = torchgram.vjp_and_gramian(aux_fn, W, X, batch_dim=batch_dim, has_aux=True)
    direction = vjp_fn(torch.ones_like(out))
    tensors = [out, G, aux["h"], *direction.values()]
    assert not any(t.requires_grad for t in tensors)
    # aux used the parameters again: those uses' taps get zero cotangents
    expected = flat_gramian(losses, W, X)
    assert torch.allclose(torchgram.flatten(G_aux), expected, rtol=1e-10)


@pytest.mark.parametrize("outside", ["parameter", "data", "closure"])
def test_a_graph_when_something_outside_requires_grad(outside) -> None:
    params = {k: v.clone().requires_grad_(outside == "parameter") for k, v in W.items()}
    x = X.clone().requires_grad_(outside == "data")
    scale = torch.tensor(1.5, dtype=D, requires_grad=outside == "closure")

    def fn(params, x):
        return losses(params, x) * scale

    G = torchgram.gramian(fn, params, x, batch_dim=0)
    assert G.requires_grad
    with torch.no_grad():
        assert not torchgram.gramian(fn, params, x, batch_dim=0).requires_grad


def test_needs_grad_beyond_the_taps() -> None:
    tap = torch.zeros(3, requires_grad=True)
    other = torch.ones(3, requires_grad=True)
    assert not _reverse._needs_grad_beyond([(tap * 2).sum()], (tap,))
    assert _reverse._needs_grad_beyond([(tap * other).sum()], (tap,))
    assert _reverse._needs_grad_beyond([other], (tap,))  # a leaf itself
    assert not _reverse._needs_grad_beyond([torch.ones(2)], (tap,))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_inference_mode(paths, batch_dim) -> None:
    """Autograd records nothing under inference mode: the run goes to vjp, which still does."""
    with torch.inference_mode():
        G = torchgram.gramian(losses, W, X, batch_dim=batch_dim)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(losses, W, X), rtol=1e-10)
    assert paths == ["vjp"]


def test_no_graph_when_only_aux_needs_one() -> None:
    scale = torch.tensor(2.0, dtype=D, requires_grad=True)

    def fn(params, x):
        return losses(params, x), {"scaled": x.sum() * scale}

    out, _, G, _ = torchgram.vjp_and_gramian(fn, W, X, batch_dim=0, has_aux=True)
    assert not out.requires_grad and not G.requires_grad


_CASTS = {
    "to-dtype": lambda w: w.to(D),
    "to-device": lambda w: w.to("cpu"),
    "double": lambda w: w.double(),
    "type": lambda w: w.type(D),
    "type-as": lambda w: w.type_as(X),
    "cpu": lambda w: w.cpu(),
    "atleast-2d": torch.atleast_2d,
    "resolve-conj": lambda w: w.resolve_conj(),
}


@pytest.mark.parametrize("cast", list(_CASTS))
@pytest.mark.parametrize("batch_dim", [0, None])
def test_casts_to_what_a_parameter_already_is(paths, batch_dim, cast) -> None:
    """A cast of a parameter to the dtype or device it already has returns the parameter itself
    (or, in the probe under a transform, a new wrapper of the same values): a view of the same
    elements, whose later uses count, on a whole leaf and on a view. Exact."""
    to = _CASTS[cast]

    def fn(params, x):
        h = torch.tanh(x @ to(params["w"]))
        vt = params["v"].T
        return torch.tanh(h[:, :2] @ to(vt)) @ vt.T + h @ to(params["v"])  # [B, 2]

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    for _ in range(2):  # with batch_dim, the second call is the batched run alone
        G = transform(W, X)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, W, X), rtol=1e-10)
    assert paths[-1] == ("batched" if batch_dim == 0 else "autograd")


@pytest.mark.parametrize("batch_dim", [0, None])
def test_outputs_without_an_edge_of_their_own(paths, batch_dim) -> None:
    """Plain autograd takes each use's output by its gradient edge. An output that is one of the
    op's inputs (``type_as`` of data already of that type, the data used elsewhere too) has no
    edge of its own, nor has one computed without grad: each gets a leaf tap added instead.
    Exact either way."""

    def fn(params, x):
        h = torch.tanh(x @ params["w"])
        with torch.no_grad():
            scale = (x @ params["w"]).abs()[:, :2]
        return torch.tanh(h.type_as(params["v"]) @ params["v"]) * scale + h[:, :2]

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    for _ in range(2):
        G = transform(W, X)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, W, X), rtol=1e-10)
    assert paths[-1] == ("batched" if batch_dim == 0 else "autograd")


@pytest.mark.parametrize("batch_dim", [0, None])
def test_attention_kernel_chosen_only_where_fn_calls_attention(monkeypatch, batch_dim) -> None:
    """The math kernel of scaled_dot_product_attention (the one vmap can batch) is chosen for the
    runs of fn that call attention, and choosing it is skipped for the others."""
    chosen: list[bool] = []
    choose = _tape.math_kernel

    def spy():
        chosen.append(True)
        return choose()

    monkeypatch.setattr(_tape, "math_kernel", spy)
    F = torch.nn.functional

    def attention(params, x):  # x: [B, T, 4]
        q = x @ params["w"]
        return F.scaled_dot_product_attention(q, q, q).sum(-2)  # [B, 3]

    def plain(params, x):
        return torch.tanh(x @ params["w"]).sum(-2)

    x = torch.randn(5, 2, 4, dtype=D)
    for fn, expected in ((attention, True), (plain, False)):
        chosen.clear()
        transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
        for _ in range(2):
            G = transform(W, x)
        assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, W, x), rtol=1e-10)
        assert bool(chosen) == expected


@pytest.mark.parametrize("batch_dim", [0, None])
def test_parameters_made_under_inference_mode(paths, batch_dim) -> None:
    """An inference tensor can have no copy that requires grad: the run then adds taps to the
    outputs as under vmap (and with batch_dim, fn runs under vmap). Exact. (Autograd cannot save
    an inference tensor for backward, so fn uses the parameter on data only.)"""
    with torch.inference_mode():
        w = W["w"].clone()

    def fn(w, x):
        return torch.tanh(x @ w)  # [B, 3]

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    for _ in range(2):
        G = transform(w, X)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, W["w"], X), rtol=1e-10)
    assert "batched" not in paths and paths[-1] == "autograd"


@pytest.mark.parametrize("batch_dim", [0, None])
def test_parameters_read_from_a_closure(batch_dim) -> None:
    """fn may use the parameter tensors it was given through a closure (a module's own
    parameters) instead of its argument: plain autograd runs fn on copies of them, and a use of
    the originals is a use of the same leaf. The same Gramian as fn using its argument."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
    ).double()
    model.requires_grad_(False)
    params = list(model.parameters())

    def closure(params, x):
        return model(x)

    def argument(params, x):
        named = dict(zip(dict(model.named_parameters()), params, strict=True))
        return torch.func.functional_call(model, named, (x,))

    expected = flat_gramian(argument, params, X)
    for fn in (closure, argument):
        transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
        for _ in range(2):
            G = transform(params, X)
        assert torch.allclose(torchgram.flatten(G), expected, rtol=1e-10)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_data_made_under_inference_mode(paths, batch_dim) -> None:
    """Autograd cannot save an inference tensor for backward, which a run on parameters that
    require grad must (a module's own): such data is copied once into a plain tensor at the
    boundary, and the runs stay plain autograd. Exact."""
    model = torch.nn.Linear(4, 3).double()
    params = dict(model.named_parameters())  # they require grad
    with torch.inference_mode():
        x = X.clone()

    def fn(params, x):
        return torch.tanh(torch.func.functional_call(model, params, (x,)))  # [B, 3]

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    for _ in range(2):
        G = transform(params, x)
        assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, params, X), rtol=1e-10)
    assert "vjp" not in paths and x.is_inference()


def test_a_scalar_parameter() -> None:
    """A 0-dim parameter (a scale) and a 0-dim use output (a dot product) get 0-dim taps
    (without batch_dim, where the taps are exactly the outputs' shapes)."""
    s = torch.tensor(0.7, dtype=D)
    params = {"s": s, "w": W["w"][:, 0]}

    def fn(params, x):
        return torch.tanh(x * params["s"]).sum(-1) + torch.dot(x[0], params["w"])

    G = torchgram.gramian(fn, params, X, batch_dim=None)
    assert torch.allclose(torchgram.flatten(G), flat_gramian(fn, params, X), rtol=1e-10)


@pytest.mark.parametrize("differentiable", [False, True])
def test_aux_returns_the_callers_parameters(differentiable) -> None:
    """fn runs on copies of the parameters; a parameter it returns in aux is the caller's (not a
    copy that requires grad, also when data that require grad keep the run's graph)."""

    def fn(params, x):
        return losses(params, x).sum(0), params["w"]

    x = X.clone().requires_grad_(differentiable)
    G, aux = torchgram.gramian(fn, W, x, has_aux=True)
    assert not aux.requires_grad and aux.data_ptr() == W["w"].data_ptr()
    assert G.requires_grad == differentiable
    assert torch.allclose(torchgram.flatten(G), flat_gramian(lambda p, x: fn(p, x)[0], W, X))


class _Scale(torch.autograd.Function):
    """``x * w`` with its own backward, usable under torch.func (``setup_context``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w):
        return x * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, g * x


def _through_a_custom_function(params, x):
    return torch.tanh(_Scale.apply(x @ params["w"], params["s"])) @ params["v"]  # [B, 2]


@pytest.mark.parametrize("batch_dim", [0, None])
def test_custom_autograd_function(paths, batch_dim) -> None:
    """torch.func (and so the probe) sees a custom Function as one call, plain autograd sees the
    ops of its forward: the run is made where it is seen as in the probe."""
    params = {**W, "s": torch.randn(3, dtype=D)}
    transform = torchgram.gramian_of(_through_a_custom_function, batch_dim=batch_dim)
    expected = flat_gramian(_through_a_custom_function, params, X)
    for _ in range(2):  # the first call probes, the second is a training loop's
        G = transform(params, X)
        assert torch.allclose(torchgram.flatten(G), expected, rtol=1e-10)
    # without batch_dim under vjp (the first call's plain run hands itself back on meeting the
    # Function's forward); with it, plain autograd through vmap, which sees it as one call
    assert paths == (["autograd", "vjp", "vjp"] if batch_dim is None else ["autograd"] * 2)


def test_batched_pull_back_matches_autograd_grad() -> None:
    """The pull-back's own batching of the rows gives what ``autograd.grad(is_grads_batched=True)``
    gives: for a tensor and a gradient edge, an unused tap (None), and with a graph."""
    w = torch.randn(4, 3, dtype=D, requires_grad=True)
    unused = torch.zeros(2, dtype=D, requires_grad=True)
    h = X @ w
    out = torch.tanh(h) @ torch.randn(3, 2, dtype=D)
    taps = (w, torch.autograd.graph.get_gradient_edge(h), unused)
    rows = torch.randn(3, *out.shape, dtype=D)
    for create in (False, True):
        mine = _reverse._grad(out, taps, rows, True, retain_graph=True, create_graph=create)
        theirs = torch.autograd.grad(
            out,
            taps,
            rows,
            retain_graph=True,
            create_graph=create,
            allow_unused=True,
            is_grads_batched=True,
        )
        assert mine[2] is None and theirs[2] is None
        for a, b in zip(mine[:2], theirs[:2], strict=True):
            assert torch.equal(a, b)
            assert a.requires_grad == create
    (second,) = torch.autograd.grad(mine[0].sum(), w, retain_graph=True)  # create_graph's
    (expected,) = torch.autograd.grad(theirs[0].sum(), w)
    assert torch.allclose(second, expected, rtol=1e-12)


def test_row_by_row_stacks_each_tap_and_keeps_none() -> None:
    """Rows pulled one at a time come back stacked per tap, a tap the output does not depend
    on stays None, and no rows give nothing."""
    from torchgram._reverse import _row_by_row

    rows = torch.arange(6.0).reshape(3, 2)
    first, unused, second = _row_by_row(lambda row: (2 * row, None, row.sum()), rows)
    assert torch.equal(first, 2 * rows) and unused is None
    assert torch.equal(second, rows.sum(1))
    assert _row_by_row(lambda row: (row,), rows[:0]) == ()
