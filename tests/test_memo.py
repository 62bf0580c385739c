"""A transform remembers its probe and sample check per argument signature (torchgram._memo)."""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from conftest import count_calls
from oracle import flat_gramian
from torch import nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap
from zoo import cases

import torchgram
from torchgram import _memo, _run

D = torch.float64


class Counted:
    """fn, counting its calls."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.fn(*args)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry per probe of fn."""
    return count_calls(monkeypatch, _run, "probe")


def _params(dtype: torch.dtype = D) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a": torch.randn(4, 5, dtype=dtype),
        "b": torch.randn(5, dtype=dtype),
        "c": torch.randn(5, 5, dtype=dtype),
    }


def _losses(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x @ w["a"]) @ w["b"] - y) ** 2


def _data(batch: int = 6, dtype: torch.dtype = D) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 4, dtype=dtype), torch.randn(batch, dtype=dtype)


def _assert_oracle(G: torch.Tensor, fn: Callable[..., Any], *args: Any) -> None:
    expected = flat_gramian(fn, *args)
    assert torch.allclose(G.reshape(expected.shape), expected, rtol=1e-10, atol=1e-12)


def test_later_calls_run_fn_once() -> None:
    fn = Counted(_losses)
    w, (x, y) = _params(), _data()
    transform = torchgram.gramian_of(fn, batch_dim=0)
    transform(w, x, y)
    assert fn.calls == 3  # probe, run, sample check
    G = transform(w, x + 1, y)  # new values, same signature
    assert fn.calls == 4
    _assert_oracle(G, _losses, w, x + 1, y)
    transform(w, *_data(batch=5))
    assert fn.calls == 7
    transform(_params(torch.float32), *_data(dtype=torch.float32))
    assert fn.calls == 10
    whole = torchgram.gramian_of(fn)  # batch_dim=None: one run, from the first call
    whole(w, x, y)
    assert fn.calls == 11
    whole(w, x, y)
    assert fn.calls == 12
    with torch.no_grad():
        whole(w, x, y)
    assert fn.calls == 13


def test_eager_forms_remember_per_fn() -> None:
    """gramian and vjp_and_gramian called in a loop with one fn run it once per call after the
    first, as a transform built once does (they share what they learned of fn)."""
    fn = Counted(_losses)
    w, (x, y) = _params(), _data()
    for calls in [3, 4]:  # probe, vmapped and batched runs; then the batched run
        G = torchgram.gramian(fn, w, x, y, batch_dim=0)
        assert fn.calls == calls
        _assert_oracle(G, _losses, w, x, y)
    for calls in [5, 6]:
        torchgram.vjp_and_gramian(fn, w, x, y, batch_dim=0)
        assert fn.calls == calls
    for calls in [7, 8]:  # without batch_dim: once from the first call
        torchgram.gramian(fn, w, x, y)
        assert fn.calls == calls


def test_eager_memory_does_not_keep_fn_or_its_model_alive() -> None:
    def call() -> tuple[weakref.ref, weakref.ref]:
        model = nn.Linear(4, 1).double()
        params = {k: v.detach() for k, v in model.named_parameters()}

        def fn(params, x):
            return functional_call(model, params, (x,)).squeeze(-1)

        for _ in range(2):
            torchgram.gramian(fn, params, X, batch_dim=0)
        assert fn in _memo._EAGER
        return weakref.ref(model), weakref.ref(fn)

    dead = call()
    gc.collect()
    assert dead[0]() is None and dead[1]() is None


def test_eager_memory_of_a_bound_method() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1).double()

        def losses(self, params, x):
            return functional_call(self.linear, params, (x,)).squeeze(-1)

    model = Model()
    params = {k: v.detach() for k, v in model.linear.named_parameters()}
    calls = [0]
    original = Model.losses

    def counted(self, params, x):
        calls[0] += 1
        return original(self, params, x)

    Model.losses = counted  # type: ignore[method-assign]
    for _ in range(3):  # model.losses is a new bound method each time it is read
        torchgram.gramian(model.losses, params, X, batch_dim=0)
    assert calls[0] == 3 + 2
    dead = weakref.ref(model)
    del model
    gc.collect()
    assert dead() is None


def test_only_the_latest_signatures_are_kept() -> None:
    fn = Counted(_losses)
    w = _params()
    transform = torchgram.gramian_of(fn, batch_dim=0)
    for batch in range(2, 11):  # nine signatures
        transform(w, *_data(batch))
    assert fn.calls == 27
    transform(w, *_data(10))
    assert fn.calls == 28
    transform(w, *_data(2))  # the oldest was forgotten
    assert fn.calls == 31


@pytest.mark.parametrize("size", [0, 1, 3])
def test_probes_keep_their_size(size: int) -> None:
    probed = _memo.Probed([], torch.Size(()))
    probes = _memo.Probes(size)
    for key in range(5):
        probes.keep(key, probed)
    assert len(probes) == size
    assert (probes.take(4) is probed) == (size > 0)


def test_non_tensor_arguments_are_part_of_the_signature() -> None:
    def fn(w, x, y, power):
        return _losses(w, x, y) ** power

    counted = Counted(fn)
    transform = torchgram.gramian_of(counted, batch_dim=0)
    w, (x, y) = _params(), _data()
    for power, calls in [(2, 3), (2, 4), (3, 7)]:
        G = transform(w, x, y, power)
        assert counted.calls == calls
    _assert_oracle(G, fn, w, x, y, 3)


def test_unhashable_arguments_are_not_remembered() -> None:
    def fn(w, x, y, columns):
        return _losses(w, x[:, sorted(columns)], y)

    counted = Counted(fn)
    transform = torchgram.gramian_of(counted, batch_dim=0)
    w, (x, y) = _params(), _data()
    w = {**w, "a": w["a"][:2]}
    for calls in [3, 6]:
        G = transform(w, x, y, {0, 2})
        assert counted.calls == calls
    _assert_oracle(G, fn, w, x, y, {0, 2})


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "lstm"])
def test_remembered_calls_match_oracle(name: str, batch_dim: int | None) -> None:
    case = cases()[name]
    fn = Counted(case.fn)
    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    for args in [case.args, tuple(torch.randn_like(x) for x in case.args)]:
        G = transform(case.params, *args)
        _assert_oracle(G, case.fn, case.params, *args)
    # with batch_dim: the probe, the vmapped run, the batched run compared with it (also where
    # its rows turn out not to be the samples: multi-head attention merges the samples inside
    # the tokens), then one call; without: one run per call
    assert fn.calls == (3 + 1 if batch_dim == 0 else 2)


def _uses(mode: str, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn's parameter uses: one per layer, one more at the end, or narrower ones."""
    if mode == "narrow":
        return (torch.tanh(x @ w["a"][:, :3]) @ w["b"][:3]) ** 2
    h = torch.tanh(x @ w["a"])
    out = (h @ w["b"]) ** 2
    if mode == "more":
        out = out + (h @ w["c"]).pow(2).sum(-1)
    return out


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize(
    "first, then", [("one", "more"), ("more", "one"), ("one", "narrow"), ("narrow", "one")]
)
def test_fn_that_changes_its_uses_is_probed_again(
    first: str, then: str, batch_dim: int | None, probes: list[None]
) -> None:
    mode = [first]

    def fn(w, x):
        return _uses(mode[0], w, x)

    w, (x, _) = _params(), _data()
    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    for current, probed in [(first, 1), (then, 2), (then, 2)]:
        mode[0] = current
        G = transform(w, x)
        assert len(probes) == (probed if batch_dim == 0 else 0)  # None: taps made as it runs
        _assert_oracle(G, fn, w, x)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("start", [0, 1])
def test_fn_that_changes_its_uses_between_probe_and_run_is_refused(
    start: int, batch_dim: int | None
) -> None:
    calls = [start]

    def fn(w, x):
        calls[0] += 1
        return _uses("more" if calls[0] % 2 else "one", w, x)

    if batch_dim is None:  # one run: its own uses, exact
        x = _data()[0]
        G = torchgram.gramian(fn, _params(), x)
        used = functools.partial(_uses, "more" if calls[0] % 2 else "one")
        _assert_oracle(G, used, _params(), x)
        return
    with pytest.raises(RuntimeError, match="fn used its parameters differently in two runs"):
        # without the sample check, the run after the probe is the vmapped one
        torchgram.gramian(fn, _params(), _data()[0], batch_dim=batch_dim, check_samples=False)
    # with it, a batched run that does not fit is made again under vmap, and the check refuses
    with pytest.raises((RuntimeError, ValueError), match="differently|independently"):
        torchgram.gramian(fn, _params(), _data()[0], batch_dim=batch_dim)


def test_samples_are_checked_until_the_check_passed() -> None:
    def mixes(w, x, y):
        h = _losses(w, x, y)
        return h - h.mean(0, keepdim=True)

    w, (x, y) = _params(), _data()
    transform = torchgram.gramian_of(mixes, batch_dim=0)
    for _ in range(2):  # a failed call leaves nothing behind
        with pytest.raises(ValueError, match="does not treat samples independently"):
            transform(w, x, y)

    fn = Counted(_losses)
    unchecked = torchgram.gramian_of(fn, batch_dim=0, check_samples=False)
    for calls in [2, 3]:  # probe and run, then the run
        unchecked(w, x, y)
        assert fn.calls == calls


X = torch.randn(5, 4, dtype=D)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_batchnorm_switched_to_training_is_refused(
    batch_dim: int | None, probes: list[None]
) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(params, x):
        return functional_call(model, params, (x,)).pow(2).sum(-1)

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim)
    _assert_oracle(transform(params, X), fn, params, X)
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(ValueError, match="changes in place a tensor it did not create.*eval"):
        transform(params, X)
    assert len(probes) == (batch_dim == 0)  # refused in the run with remembered shapes
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name])
    model.eval()
    _assert_oracle(transform(params, X), fn, params, X)


def test_batch_statistics_on_a_remembered_signature_are_refused(probes: list[None]) -> None:
    mean, var = torch.zeros(5, dtype=D), torch.ones(5, dtype=D)
    training = [False]

    def fn(w, x):
        return F.batch_norm(x @ w["a"], mean, var, training=training[0]).pow(2).sum(-1)

    w = _params()
    transform = torchgram.gramian_of(fn, batch_dim=0)
    transform(w, X)
    training[0] = True
    with pytest.raises(ValueError, match="batch_norm in training mode"):
        transform(w, X)
    assert len(probes) == 1
    assert torch.equal(mean, torch.zeros(5, dtype=D)) and torch.equal(var, torch.ones(5, dtype=D))


def test_each_transform_remembers_on_its_own() -> None:
    w, (x, y) = _params(), _data()
    expected = flat_gramian(_losses, w, x, y)
    gradient = grad(lambda w: _losses(w, x, y).sum())(w)

    with_aux = Counted(lambda w, x, y: (_losses(w, x, y), {"x": x}))
    transform = torchgram.gramian_of(with_aux, batch_dim=0, has_aux=True)
    for _ in range(2):
        G, aux = transform(w, x, y)
        assert torch.allclose(G, expected, rtol=1e-10) and torch.equal(aux["x"], x)
    assert with_aux.calls == 4

    fn = Counted(_losses)
    gramian_fn = torchgram.gramian_of(fn, batch_dim=0)
    step_fn = torchgram.jd_grad(fn, torchgram.weightings.sum, batch_dim=0)
    for _ in range(2):
        assert torch.allclose(gramian_fn(w, x, y), expected, rtol=1e-10)
        step = step_fn(w, x, y)
        assert all(torch.allclose(step[k], gradient[k], rtol=1e-10) for k in w)
    assert fn.calls == 2 * 3 + 2  # each transform probes and checks once, then runs fn once


def test_remembered_under_an_outer_vmap() -> None:
    members = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double() for _ in "abc"]
    stacked, _ = stack_module_state(members)
    base = members[0]

    def losses(model):
        return lambda params, x, y: (functional_call(model, params, (x,)).squeeze(-1) - y) ** 2

    fn = Counted(losses(base))
    transform = vmap(torchgram.gramian_of(fn, batch_dim=0), in_dims=(0, None, None))
    for _ in range(2):
        x, y = _data()
        G = transform(stacked, x, y)
        for i, member in enumerate(members):
            params = {k: v.detach() for k, v in member.named_parameters()}
            _assert_oracle(G[i], losses(member), params, x, y)
    assert fn.calls == 4  # probe, run and sample check (beneath the vmap), then one run


@pytest.mark.parametrize("batch_dim", [0, None])
def test_autocast_is_part_of_the_signature(batch_dim: int | None) -> None:
    """Taps learned without autocast would change the dtypes fn computes in under it."""
    w = _params(torch.float32)
    x, y = _data(dtype=torch.float32)

    def fn(w, x, y):
        hidden = x @ w["a"]
        return (torch.tanh(hidden) @ w["b"] - y) ** 2, hidden.dtype

    transform = torchgram.gramian_of(fn, batch_dim=batch_dim, has_aux=True)
    _, dtype = transform(w, x, y)
    assert dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        G, dtype = transform(w, x, y)
        fresh, fresh_dtype = torchgram.gramian(fn, w, x, y, batch_dim=batch_dim, has_aux=True)
        assert dtype == fresh_dtype == fn(w, x, y)[1] == torch.bfloat16
    assert torch.equal(G, fresh)


def test_linear_with_bias_keeps_autocast_dtype() -> None:
    """Under vmap (batch_dim) fn must see the dtype it sees alone: vmap's own rule for a biased
    linear adds the bias in float32 under autocast (the tape adds it in the product's dtype)."""
    torch.manual_seed(0)
    w = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    x = torch.randn(5, 4)

    dtypes = []

    def fn(w, x):
        out = torch.nn.functional.linear(x, w["w"], w["b"])
        dtypes.append(out.dtype)
        return out.float().pow(2).sum(-1), out.dtype

    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 rounding differs per sample
        _, dtype = torchgram.gramian(fn, w, x, batch_dim=0, has_aux=True, check_samples=False)
        assert dtype == fn(w, x)[1] == torch.bfloat16
        assert dtypes == [torch.bfloat16] * 3  # probe, run, fn alone
    w, x = {k: v.double() for k, v in w.items()}, x.double()
    G, dtype = torchgram.gramian(fn, w, x, batch_dim=0, has_aux=True)
    assert dtype == torch.float64
    _assert_oracle(G, lambda w, x: fn(w, x)[0], w, x)


def _bfloat16_oracle(fn: Callable[..., Any], params: Any, *args: Any) -> torch.Tensor:
    """``[m, P]``: the Jacobian by ``jacrev`` of fn as it is called (under autocast, or entering
    it), in float64 from there on."""
    out = fn(params, *args)
    jacobian = jacrev(fn)(params, *args)
    return torch.cat([j.reshape(out.numel(), -1) for j in optree.tree_leaves(jacobian)], 1).double()


# Each gradient entry is made from the same bfloat16 activations and cotangents on both sides,
# but rounded to bfloat16 (unit roundoff u = 2^-8) at up to two places where the other side does
# not round, or rounds in another order: jacrev's weight gradient is the gradient of the
# weight's bfloat16 copy, rounded to bfloat16, where the rules keep the products in float32; and
# the cotangents are pulled back by other kernels (rows batched or not). So |ΔJ_i| <= 2u |J_i|,
# and |ΔG_ij| <= |ΔJ_i| |J_j| + |J_i| |ΔJ_j| <= 4u |J_i| |J_j| (Cauchy-Schwarz), per entry: no
# slack from the largest entry of G (the old reference, torchgram's own float32 Gramian, needed
# 3-5% of it). Measured: up to 1.3u.
BFLOAT16_GRAMIAN = 4 * 2.0**-8


def _assert_bfloat16_oracle(G: torch.Tensor, J: torch.Tensor) -> None:
    """``G`` against ``J Jᵀ``, per entry; a Gramian returned in bfloat16 (autocast around the
    call: the rules' products run under it too) is rounded once more, by u |G_ij| at most."""
    expected = J @ J.T
    norms = J.norm(dim=1)
    error = (torchgram.flatten(G).double() - expected).abs() / (norms[:, None] * norms[None, :])
    tolerance = BFLOAT16_GRAMIAN + (2.0**-8 if G.dtype == torch.bfloat16 else 0.0)
    assert float(error.max()) <= tolerance, f"{float(error.max()):.3g} of |J_i| |J_j|"


def test_autocast_without_batch_dim_several_rows() -> None:
    """With one sample and several rows the ghost form multiplies similarities (float32 under
    autocast) by cotangents (bfloat16): computed in the wider dtype, close to the Jacobian's
    Gramian under autocast (see ``BFLOAT16_GRAMIAN``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(8, 5)

    def fn(params, x):
        return functional_call(model, params, (x,)).float().sum(0)  # [2]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        G = torchgram.gramian(fn, params, x)
        J = _bfloat16_oracle(fn, params, x)
    _assert_bfloat16_oracle(G, J)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_autocast_inside_fn(batch_dim, layer) -> None:
    """Autocast entered inside fn: a map's input stays float32 while its output's cotangent is
    bfloat16, and the rules run after fn, outside autocast (the products of mixed dtypes
    failed). Each factor computes in the wider dtype, close to the Jacobian's Gramian under
    autocast (see ``BFLOAT16_GRAMIAN``)."""
    torch.manual_seed(0)
    if layer == "linear":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
        x = torch.randn(4, 3, 5)
    else:
        model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 2, 3))
        x = torch.randn(4, 3, 7)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(params, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return functional_call(model, params, (x,)).float().pow(2).sum((1, 2))

    J = _bfloat16_oracle(fn, params, x)
    # bfloat16 rounds a sample alone and in the batch differently: no sample check
    transform = torchgram.gramian_of(fn, batch_dim=batch_dim, check_samples=False)
    for _ in range(2):
        G = transform(params, x)
        assert G.dtype == torch.float32
        _assert_bfloat16_oracle(G, J)
