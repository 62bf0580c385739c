"""The direction reuses the per-sample gradients its Gramian built: exact, within the budget,
the leaves that save the most first, and composable with vmap and grad."""

from __future__ import annotations

import optree
import pytest
import torch
from oracle import jacobian_matrix
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import torchgram
from torchgram import _assemble, _transform
from torchgram._factors import Linear
from torchgram._ops.conv_factor import Conv

D = torch.float64


class _Net(nn.Module):
    """A convolution with few input channels (the patch products), a grouped-kernel one, a
    5 x 5 depthwise one (the forward-correlation kernel), and a linear map over 16 tokens
    (materialised), all over 16 x 16 = 256 positions: every kind of kept block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.depthwise(torch.tanh(self.mix(h))))
        return self.head(h.flatten(2).transpose(1, 2))  # [B, 256, 5]


def _setting(rows: int = 1):
    torch.manual_seed(0)
    model = _Net().double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(params, x):
        out = functional_call(model, params, (x,))  # [B, 256, 5]
        losses = [out.pow(2).mean((1, 2)), out.sin().mean((1, 2))][:rows]
        return torch.stack(losses, dim=-1) if rows > 1 else losses[0]

    return model, fn, params, torch.randn(3, 3, 16, 16, dtype=D)


def _weighted_calls(monkeypatch) -> list[str]:
    """Which factors' own ``weighted`` ran (the direction from the factors)."""
    calls: list[str] = []
    for cls in (Conv, Linear):
        original = cls.weighted

        def spy(self, weights, original=original, name=cls.__name__):
            calls.append(name)
            return original(self, weights)

        monkeypatch.setattr(cls, "weighted", spy)
    return calls


def _names(params: dict) -> list[str]:
    """The parameters' names in the order of the flattened leaves."""
    return [path[0] for path in optree.tree_paths(params)]


def _flat(tree) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in optree.tree_leaves(tree)])


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("batch_dim", [0, None])
def test_direction_from_kept_gradients_is_exact(monkeypatch, rows, batch_dim) -> None:
    model, fn, params, x = _setting(rows)
    if batch_dim is None:  # a few rows over the whole batch: each row's sample holds 3 images
        per_sample = fn
        fn = lambda p, x: per_sample(p, x).sum(0)
    calls = _weighted_calls(monkeypatch)
    out, vjp_fn, _ = torchgram.vjp_and_gramian(fn, params, x, batch_dim=batch_dim)
    weights = torch.randn_like(out)
    direction = _flat(vjp_fn(weights))
    expected = weights.reshape(-1) @ jacobian_matrix(fn, params, x)
    assert torch.allclose(direction, expected, rtol=1e-10, atol=1e-12)
    assert not calls, calls  # every weight from its kept gradients
    # the same direction again (vjp_fn may be called more than once)
    assert torch.allclose(_flat(vjp_fn(weights)), expected, rtol=1e-10, atol=1e-12)


def test_each_kernel_keeps_its_blocks() -> None:
    _, fn, params, x = _setting()
    options = _transform._options(fn, "test", 0, False, False)
    _, run = _transform._linearise(fn, (params, x), (0,), 0, options)
    run.gramian()
    names = _names(params)
    kernels = {
        names[leaf]: factor.kernel_for_gradients(run.chunk_bytes)
        for leaf, factor in run.contributions
        if isinstance(factor, Conv)
    }
    assert kernels == {
        "stem.weight": "patches",
        "mix.weight": "grouped",
        "depthwise.weight": "depthwise",
    }, kernels
    assert run.kept is not None
    assert sorted(names[leaf] for leaf in run.kept) == sorted([*kernels, "head.weight"])
    assert all(len(blocks) == 1 for blocks in run.kept.values())


class _Factor:
    """A stand-in factor whose direction saves ``gain`` times its work by reuse."""

    index = None

    def __init__(self, gain: float) -> None:
        self.gain = gain

    def reuse_gain(self) -> float:
        return self.gain

    def gradient_element_size(self) -> int:
        return 4

    def gramian_keeping(self, chunk_bytes, keep):
        raise AssertionError("not called here")


def test_the_budget_keeps_the_largest_savings_first() -> None:
    """Leaves by gain, most first (ties by position), each while it fits in the budget; none
    below the threshold, none with two factors or on a region."""
    gains = [2, 4, 0.5, 2, 1, 8]  # in units of the threshold
    leaves = [torch.zeros(n) for n in (10, 20, 1, 5, 1, 100)]
    by_leaf = {leaf: [_Factor(g * _assemble._REUSE_GAIN)] for leaf, g in enumerate(gains)}
    rows, size = 3, 3 * 4  # bytes per element of a leaf: 3 rows of float32

    def chosen(budget: int) -> set[int]:
        return _assemble._reused(by_leaf, leaves, rows, budget * size)

    assert chosen(10**6) == {0, 1, 3, 4, 5}  # leaf 2 below the threshold: not worth keeping
    assert chosen(100) == {5}
    assert chosen(99) == {1, 0, 3, 4}  # 20 + 10 + 5 + 1 (leaf 5 does not fit)
    assert chosen(29) == {1, 3, 4}  # 20, then leaf 0 does not fit, then 5 and 1
    assert chosen(0) == set()
    by_leaf[5][0].gradient_element_size = lambda: 8  # type: ignore[method-assign]
    assert chosen(100) == {1, 0, 3, 4}  # float64 gradients: twice the bytes, over the room
    assert chosen(200) == {5}
    by_leaf[1].append(_Factor(100.0))  # two factors on one leaf: summed, not kept
    region = _Factor(1000.0)
    region.index = torch.arange(50)  # type: ignore[assignment]
    by_leaf[5] = [region]
    assert chosen(10**6) == {0, 3, 4}


def test_gains_of_real_factors() -> None:
    """``T / K``: 256 output positions or tokens per sample, halved by two rows per sample."""
    for rows, gain in ((1, 256), (2, 128)):
        _, fn, params, x = _setting(rows)
        options = _transform._options(fn, "test", 0, False, False)
        _, run = _transform._linearise(fn, (params, x), (0,), 0, options)
        names = _names(params)
        gains = {
            names[leaf]: factor.reuse_gain()
            for leaf, factor in run.contributions
            if isinstance(factor, Conv | Linear)
        }
        assert set(gains.values()) == {gain}, gains
        assert set(gains) == {"stem.weight", "mix.weight", "depthwise.weight", "head.weight"}


def test_ghost_form_and_regions_keep_nothing(monkeypatch) -> None:
    """A map on one token (the ghost form builds no per-sample gradient) and a weight used
    through two regions keep nothing; their direction comes from the factors, exact."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=D)
    x = torch.randn(5, 4, dtype=D)

    def fn(params, x):
        w = params["w"]
        return torch.tanh(x @ w.T).sum(-1) + (x @ w[:4]).pow(2).sum(-1)

    options = _transform._options(fn, "test", 0, False, False)
    _, run = _transform._linearise(fn, ({"w": w}, x), (0,), 0, options)
    run.gramian()
    assert run.kept == {}
    weights = torch.randn(5, dtype=D)
    expected = weights @ jacobian_matrix(fn, {"w": w}, x)
    assert torch.allclose(run.vjp(weights)[0].reshape(-1), expected, rtol=1e-10)


def test_gramian_of_keeps_nothing(monkeypatch) -> None:
    """Without a direction to follow, the Gramian releases its factors and keeps nothing."""
    _, fn, params, x = _setting()
    kept = []
    original = _assemble.gramian_of_factors

    def spy(*args, keep=None, **kwargs):
        kept.append(keep)
        return original(*args, keep=keep, **kwargs)

    transform = torchgram.gramian_of(fn, batch_dim=0)
    transform(params, x)  # the first call compares runs (their vjps too)
    monkeypatch.setattr("torchgram._linearised.gramian_of_factors", spy)
    transform(params, x)
    assert kept == [None], kept


def test_jd_grad_under_vmap_over_an_ensemble() -> None:
    torch.manual_seed(0)
    models = [_Net().double() for _ in range(2)]
    stacked, _ = stack_module_state(models)
    stacked = {k: v.detach() for k, v in stacked.items()}
    x = torch.randn(3, 3, 16, 16, dtype=D)
    base = _Net().double()

    def fn(params, x):
        return functional_call(base, params, (x,)).pow(2).mean((1, 2))

    step = torchgram.jd_grad(fn, torchgram.weightings.upgrad, batch_dim=0)
    together = vmap(step, in_dims=(0, None))(stacked, x)
    for i in range(2):
        alone = step({k: v[i] for k, v in stacked.items()}, x)
        for name in alone:
            assert torch.allclose(together[name][i], alone[name], rtol=1e-9, atol=1e-12)


def test_direction_differentiable_through_kept_gradients() -> None:
    """``grad`` of a function of the direction: the kept gradients carry the graph."""
    _, fn, params, x = _setting()
    weights = torch.linspace(0.5, 1.5, 3, dtype=D)

    def ours(p):
        _, vjp_fn, _ = torchgram.vjp_and_gramian(fn, p, x, batch_dim=0)
        return _flat(vjp_fn(weights)).pow(2).sum()

    def oracle(p):
        return (weights @ jacobian_matrix(fn, p, x)).pow(2).sum()

    got, expected = grad(ours)(params), grad(oracle)(params)
    for name in params:
        assert torch.allclose(got[name], expected[name], rtol=1e-8, atol=1e-12), name


def test_autocast_directions_keep_the_parameters_dtype() -> None:
    """Under autocast the kept gradients are bfloat16: the direction is formed in the
    weights' precision and returned in the parameters' dtype, close to the oracle at bfloat16's
    precision; a bias (its gradients bfloat16 too, not kept) as well."""
    torch.manual_seed(0)
    p = {"w": 0.3 * torch.randn(8, 6), "b": 0.3 * torch.randn(8)}
    x = torch.randn(3, 128, 6)

    def fn(p, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.tanh(torch.nn.functional.linear(x.bfloat16(), p["w"], p["b"]))
        return y.float().pow(2).mean((-1, -2))

    options = _transform._options(fn, "test", 0, False, False)
    _, run = _transform._linearise(fn, (p, x), (0,), 0, options)
    run.gramian()
    assert run.kept is not None and list(run.kept) == [1]  # the weight (leaves: b, w)
    assert run.kept[1][0].g.dtype == torch.bfloat16
    # bfloat16 rounding differs between a batch and its samples: no sample check
    out, vjp_fn, _ = torchgram.vjp_and_gramian(fn, p, x, batch_dim=0, check_samples=False)
    weights = torch.randn_like(out)
    direction = vjp_fn(weights)
    assert {k: v.dtype for k, v in direction.items()} == {"w": torch.float32, "b": torch.float32}
    expected = weights @ jacobian_matrix(fn, p, x)
    scale = float(expected.abs().max())
    assert float((_flat(direction) - expected).abs().max()) < 2e-2 * scale
