"""Which run gives the Gramian (torchgram._run): one run of fn without batch_dim, the looped run
where vmap cannot run fn (checked against, and replaced by, the batched run where it applies),
and what a call leaves behind: running statistics updated once, put back when it fails."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from oracle import flat_gramian
from torch import nn
from torch.func import functional_call

import torchgram
from torchgram import _run

D = torch.float64
B, T = 5, 4


class Counted:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _params() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(3, 4, dtype=D), "v": torch.randn(4, dtype=D)}


def _padded() -> torch.Tensor:
    x = torch.randn(B, T, 3, dtype=D)
    x[1, 2:] = 0.0  # padding at the end of two samples
    x[3, 3:] = 0.0
    return x


def _masked(p, x):  # [B, T, 3] -> [B]
    """A padding mask made from the data and skipped when nothing is padded: a branch on
    values, as transformers' mask code makes, which vmap cannot run."""
    mask = x[..., 0] != 0
    h = torch.tanh(x @ p["w"])
    if not mask.all():
        h = h * mask[..., None]
    return h.sum(1) @ p["v"]


@pytest.fixture
def runs(monkeypatch) -> list[str]:
    taken: list[str] = []
    for name, label in [
        ("linearise_batched", "batched"),
        ("linearise_vmapped", "vmapped"),
        ("linearise_looped", "looped"),
    ]:
        original = getattr(_run, name)

        def spy(*args, original=original, label=label):
            result = original(*args)
            if result is not None:
                taken.append(label)
            return result

        monkeypatch.setattr(_run, name, spy)
    return taken


def test_a_branch_on_values_is_checked_sample_by_sample_then_batched(runs) -> None:
    fn, p = Counted(_masked), _params()
    transform = torchgram.gramian_of(fn, batch_dim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the batched run applies: no warning
        for _ in range(2):
            x = _padded()
            G = transform(p, x)
            assert torch.allclose(G, flat_gramian(_masked, p, x), rtol=1e-10)
    assert runs == ["looped", "batched", "batched"]  # vmap raised on the first call
    assert fn.calls == 1 + 1 + B + 1 + 1  # probe, vmap's try, a run per sample, batched; batched


def test_where_only_a_run_per_sample_applies_it_warns_and_is_exact(runs) -> None:
    def fn(p, x):
        return _masked(p, x), x.shape[0]

    counted, p = Counted(fn), _params()
    transform = torchgram.gramian_of(counted, batch_dim=0, has_aux=True)  # no batched run
    with pytest.warns(UserWarning, match="cannot run under torch.func.vmap.*5 runs of fn"):
        G, aux = transform(p, x := _padded())
    assert torch.allclose(G, flat_gramian(_masked, p, x), rtol=1e-10) and aux == 1
    counted.calls = 0
    G, _ = transform(p, x := _padded())
    assert torch.allclose(G, flat_gramian(_masked, p, x), rtol=1e-10)
    assert counted.calls == B and runs == ["looped", "looped"]


def test_a_branch_that_picks_other_parameters_per_sample_is_refused() -> None:
    def fn(p, x):
        w = p["w"] if x[0, 0, 0] > 0 else 2 * p["w"]
        return torch.tanh(x @ w).sum(1) @ p["v"]

    x = _padded()
    x[0, 0, 0], x[1, 0, 0] = 1.0, -1.0
    with pytest.raises(ValueError, match="applies different ops to the parameters for different"):
        torchgram.gramian(fn, _params(), x, batch_dim=0)


def test_without_batch_dim_fn_runs_once_per_call() -> None:
    fn, p = Counted(_masked), _params()
    for calls in (1, 2):
        G = torchgram.gramian(fn, p, x := _padded())
        assert fn.calls == calls
        assert torch.allclose(G, flat_gramian(_masked, p, x), rtol=1e-10)
    out, vjp_fn, G = torchgram.vjp_and_gramian(fn, p, x)
    assert fn.calls == 3


def test_an_empty_output_gives_an_empty_gramian() -> None:
    p = _params()
    x = torch.randn(0, T, 3, dtype=D)
    out, vjp_fn, G = torchgram.vjp_and_gramian(lambda p, x: torch.tanh(x @ p["w"]) @ p["v"], p, x)
    assert G.shape == (0, T, T, 0)
    assert all(torch.equal(g, torch.zeros_like(p[k])) for k, g in vjp_fn(out).items())
    with pytest.raises(ValueError, match="the batch is empty"):
        torchgram.gramian(_masked, p, x, batch_dim=0)


def _instance_normed() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.InstanceNorm1d(4, affine=True)).double()
    model[1].track_running_stats = True
    model[1].register_buffer("running_mean", torch.zeros(4, dtype=D))
    model[1].register_buffer("running_var", torch.ones(4, dtype=D))
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, params, torch.randn(B, 3, 8, dtype=D)


def test_running_statistics_are_updated_once_per_call() -> None:
    """Without batch_dim, as a plain forward updates them (not by a probe, nor by the rule
    that replays the op); exact; with batch_dim, refused before anything changes."""
    model, params, x = _instance_normed()
    plain = copy.deepcopy(model)

    def fn(params, x):
        return functional_call(model, params, (x,)).pow(2).sum((1, 2))

    for transform in (torchgram.gramian_of(fn), lambda p, x: torchgram.gramian(fn, p, x)):
        expected = flat_gramian(lambda p, x: fn(p, x), params, x)
        model.load_state_dict(plain.state_dict())
        for _ in range(2):
            G = transform(params, x)
            plain(x)
            assert torch.allclose(G, expected, rtol=1e-10)
            assert torch.equal(model[1].running_mean, plain[1].running_mean)
            assert torch.equal(model[1].running_var, plain[1].running_var)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="instance_norm with running statistics"):
        torchgram.gramian(fn, params, x, batch_dim=0)
    with pytest.raises(ZeroDivisionError):  # a call that fails after the run
        torchgram.jd_grad(fn, lambda G: 1 / 0)(params, x)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("batch_dim", [0, None])
def test_fn_calling_torchgram_itself_is_refused(batch_dim) -> None:
    """The inner call's reverse pass (backward formulas that read the parameters) runs outside
    the ops the outer call records: refused rather than inexact."""

    def inner(p, x):
        return torch.tanh(torch.tanh(x @ p["w"]) @ p["w2"]).sum((-1, -2))

    def fn(p, x):
        return inner(p, x) * torchgram.gramian(inner, p, x).trace()

    p, x = {**_params(), "w2": torch.randn(4, 4, dtype=D)}, _padded()
    with pytest.raises(ValueError, match="fn calls torchgram itself"):
        torchgram.gramian(fn, p, x, batch_dim=batch_dim)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_fn_compiled_with_torch_compile(batch_dim) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    compiled = torch.compile(model, backend="eager")

    def fn(params, x):
        return functional_call(compiled, params, (x,)).sum((-1, -2))

    x = _padded()
    G = torchgram.gramian(fn, params, x, batch_dim=batch_dim)
    plain = lambda params, x: functional_call(model, params, (x,)).sum((-1, -2))
    assert torch.allclose(G, flat_gramian(plain, params, x), rtol=1e-10)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_meta_tensors_give_the_gramians_shape(batch_dim) -> None:
    p = {k: v.to("meta") for k, v in _params().items()}
    x = _padded().to("meta")
    fn = lambda p, x: torch.tanh(x @ p["w"]).sum(1) @ p["v"]
    G = torchgram.gramian(fn, p, x, batch_dim=batch_dim)
    assert G.is_meta and G.shape == (B, B)
