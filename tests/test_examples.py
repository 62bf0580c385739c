"""Every example runs with tiny sizes and shows what it claims to show."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import optree
import pytest
import torch
from torch.func import grad, jacrev, vmap

import torchgram
from torchgram import weightings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
D = torch.float64


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class Call:
    """One call of a torchgram function by an example: what it was given and what it gave."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]  # fn's positional arguments, cloned when the call was made
    argnums: int
    batch_dim: int | None
    in_dims: Any
    result: Any


def _clone(tree: Any) -> Any:
    return optree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Every call an example makes of ``torchgram.gramian``, ``vjp_and_gramian`` and of the
    function ``jd_grad`` returns (outside ``vmap``), in order."""
    calls: list[Call] = []

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(fn, params, *args, batch_dim=None, in_dims=0, **options):
            result = real(fn, params, *args, batch_dim=batch_dim, in_dims=in_dims, **options)
            args = _clone((params, *args))
            calls.append(Call(name, fn, args, 0, batch_dim, in_dims, result))
            return result

        return call

    def jd_grad(fn, weighting, argnums=0, *, batch_dim=None, in_dims=0, **options):
        assert weighting is weightings.upgrad, "the checks below recompute upgrad's weights"
        step = real_jd_grad(fn, weighting, argnums, batch_dim=batch_dim, in_dims=in_dims, **options)

        def recording(*args):
            direction = step(*args)
            calls.append(Call("jd_grad", fn, _clone(args), argnums, batch_dim, in_dims, direction))
            return direction

        return recording

    real_jd_grad = torchgram.jd_grad
    for name in ("gramian", "vjp_and_gramian"):
        monkeypatch.setattr(torchgram, name, spy(name, getattr(torchgram, name)))
    monkeypatch.setattr(torchgram, "jd_grad", jd_grad)
    return calls


def _double(tree: Any) -> Any:
    """Floating-point tensors in float64 (detached), others as they are."""
    return optree.tree_map(
        lambda x: x.detach().to(D) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
        tree,
    )


def _flat(grads: Any, lead: int) -> torch.Tensor:
    return torch.cat([g.reshape(*g.shape[:lead], -1) for g in optree.tree_leaves(grads)], -1)


def jacobian(call: Call) -> torch.Tensor:
    """``[m, P]`` in float64, independently of torchgram: with ``batch_dim=0``, the per-sample
    gradients of each of a sample's K outputs by ``vmap(grad(...))`` over the samples, rows
    ordered ``(sample, output)`` as ``flatten(G)``'s; without it, ``jacrev``."""
    args = _double(call.args)
    if call.batch_dim is None:
        m = call.fn(*args).numel()
        jac = jacrev(call.fn, argnums=call.argnums)(*args)
        return torch.cat([j.reshape(m, -1) for j in optree.tree_leaves(jac)], dim=1)
    assert call.batch_dim == 0
    dims = call.in_dims if isinstance(call.in_dims, tuple) else (call.in_dims,) * len(args)
    dims = tuple(None if i == call.argnums else d for i, d in enumerate(dims))

    def output(*sample: Any) -> torch.Tensor:  # fn's arguments with one sample: [K]
        one = (x if d is None else x.unsqueeze(d) for x, d in zip(sample, dims, strict=True))
        return call.fn(*one).reshape(-1)

    first = (x if d is None else x.select(d, 0) for x, d in zip(args, dims, strict=True))
    K = output(*first).numel()
    rows = [  # [B, P]: output k of every sample
        _flat(vmap(grad(lambda *a, k=k: output(*a)[k], argnums=call.argnums), dims)(*args), 1)
        for k in range(K)
    ]
    return torch.stack(rows, dim=1).flatten(0, 1)  # [B * K, P]


def gramian_of(call: Call) -> torch.Tensor:
    """The ``[m, m]`` Gramian the call returned."""
    G = call.result[2] if call.name == "vjp_and_gramian" else call.result
    return torchgram.flatten(G)


def assert_gramian(call: Call, rtol: float = 1e-5) -> torch.Tensor:
    """The call's Gramian is ``J Jᵀ`` of the independent Jacobian, up to float32 rounding
    relative to its largest entry. Returns that Jacobian."""
    J = jacobian(call)
    expected = J @ J.T
    got = gramian_of(call).to(D)
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    return J


def assert_direction(call: Call, rtol: float = 2e-4) -> None:
    """The call's direction is ``Jᵀ upgrad(J Jᵀ)`` of the independent Jacobian, up to the float32
    accuracy of upgrad's solver (3e-5 of the largest weight, see test_weightings_degenerate)."""
    J = jacobian(call)
    expected = J.T @ weightings.upgrad(J @ J.T)
    got = _flat(call.result, 0).to(D)
    torch.testing.assert_close(got, expected, rtol=0, atol=rtol * float(expected.abs().max()))


def cosines(J: torch.Tensor) -> torch.Tensor:
    norms = J.norm(dim=1)
    return (J @ J.T) / (norms[:, None] * norms[None, :])


def test_every_example_is_tested() -> None:
    tested = {
        name.removeprefix("test_").split("__")[0]
        for name in globals()
        if name.startswith("test_") and name != "test_every_example_is_tested"
    }
    scripts = {path.stem for path in EXAMPLES.glob("*.py")}
    assert scripts <= tested, f"examples without a test: {sorted(scripts - tested)}"


def test_quickstart(capsys, recorded) -> None:
    G = load("quickstart").main()
    assert G.shape == (6, 6)
    (call,) = recorded
    J = assert_gramian(call)  # against per-sample gradients from vmap(grad), float64
    # The count it prints, against the cosines of those gradients.
    found = re.search(
        r"(\d+) of 15 pairs of samples have conflicting gradients", capsys.readouterr().out
    )
    assert found is not None
    assert int(found.group(1)) == int((cosines(J) < 0).sum()) // 2


def test_instance_wise_upgrad(recorded) -> None:
    result = load("instance_wise_upgrad").main(n_samples=96, batch_size=16, epochs=2)
    gramians = [call for call in recorded if call.name == "gramian"]
    steps = [call for call in recorded if call.name == "jd_grad"]
    assert len(gramians) == 1 and len(steps) == 1 + 2 * 6  # the first step, then 2 epochs of 6
    assert_gramian(gramians[0])
    assert_direction(steps[0])
    assert_direction(steps[-1])
    assert bool((result["first_slopes"] >= result["first_slack"] - 1e-5).all())
    for name in ("upgrad", "sgd"):
        assert result["history"][name][-1] < result["initial"]
    # Non-conflicting steps raise fewer per-sample losses than steps along the mean gradient.
    assert result["raised"]["upgrad"] < result["raised"]["sgd"]


def test_multi_task(recorded) -> None:
    result = load("multi_task").main(n_samples=64, batch_size=32, epochs=3)
    # The trunk's direction (argnums=0, no batch_dim: one row per task) against jacrev's.
    assert len(recorded) == 1 + 3 * 2 and {call.name for call in recorded} == {"jd_grad"}
    assert_direction(recorded[0])
    assert_direction(recorded[-1])
    assert result["first_slopes"].shape == (3,)
    assert bool((result["first_slopes"] > 0).all())  # the trunk step helps every task
    for name in ("upgrad", "mean"):
        assert bool((result["final"][name] < result["initial"]).all())


def test_instance_wise_multi_task(capsys, recorded) -> None:
    result = load("instance_wise_multi_task").main(n_samples=32, batch_size=8, epochs=2)
    assert result["gramian"].shape == (8, 3, 3, 8)
    # [B, K, K, B] against the gradients of every (sample, task) loss, rows (i, k) as flatten's.
    first, *steps = recorded
    assert first.name == "vjp_and_gramian" and first.result[2] is result["gramian"]
    assert_gramian(first)
    assert [call.name for call in steps] == ["jd_grad"] * 8
    assert_direction(steps[0])
    assert result["weights"].shape == (8, 3)
    assert bool((result["first_slopes"] >= result["first_slack"] - 1e-5).all())
    assert bool((result["history"][-1] < result["initial"]).all())
    assert "flatten(G)[i*K + k, j*K + l]: True" in capsys.readouterr().out


def test_partial_jd() -> None:
    module = load("partial_jd")
    result = module.main(n_samples=64, batch_size=16, epochs=2)
    assert result["history"][-1][0] < result["initial"]

    # The direction against an oracle: jacrev on the late layers, UPGrad, Jᵀw; grad elsewhere.
    model = module.make_model().double()
    x, y = torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 4, (8,))
    direction = module.partial_direction(model)(x, y)
    late, early = module.split(model)
    losses = module.per_sample_losses(model)
    jacobian = jacrev(losses)(late, early, x, y)
    J = torch.cat([jacobian[k].flatten(1) for k in late], dim=1)
    expected = J.T @ weightings.upgrad(J @ J.T)
    got = torch.cat([direction[k].flatten() for k in late])
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-10)
    mean_grad = torch.func.grad(lambda e: losses(late, e, x, y).mean())(early)
    for k in early:
        assert torch.allclose(direction[k], mean_grad[k], rtol=1e-10, atol=1e-12)
    assert set(direction) == {name for name, _ in model.named_parameters()}


def test_monitoring(tmp_path, capsys, recorded) -> None:
    path = tmp_path / "monitoring.png"
    result = load("monitoring").main(path, n_samples=60, batch_size=12, epochs=1)
    assert path.read_bytes().startswith(b"\x89PNG")
    assert str(path) in capsys.readouterr().out
    # The norms and cosines it draws, against those of per-sample gradients from vmap(grad).
    (call,) = recorded
    assert call.result is result["gramian"]
    J = assert_gramian(call)
    cosine, norms = result["cosine"], result["norms"]
    torch.testing.assert_close(norms.to(D), J.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(cosine.to(D), cosines(J), rtol=0, atol=1e-5)
    same = result["labels"][:, None] == result["labels"][None, :]
    assert cosine[same].mean() > cosine[~same].mean()  # what the heatmap shows


def test_dp_sgd(capsys, recorded) -> None:
    module = load("dp_sgd")
    result = module.main(n_samples=64, batch_size=16, epochs=1)
    assert recorded and {call.name for call in recorded} == {"vjp_and_gramian"}
    assert_gramian(recorded[0])
    assert_gramian(recorded[-1])
    assert result["error"] < 1e-6 and result["norm_error"] < 1e-5
    assert 0 < result["clipped"] < 16  # some gradients are clipped, not all: a real check
    assert "max |difference| with vmap(grad) + clip + mean" in capsys.readouterr().out
    # The Gramian route against the explicit one in float64, with every gradient clipped.
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(params, x, y):
        out = torch.func.functional_call(model, params, (x,)).squeeze(-1)
        return (out - y) ** 2

    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    ours, norms = module.clipped_mean(losses, params, x, y, clip=1e-3)
    theirs, _ = module.explicit_clipped_mean(losses, params, x, y, clip=1e-3)
    assert bool((norms > 1e-3).all())
    for k in params:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-10, atol=1e-14)


def test_empirical_ntk(tmp_path, capsys, recorded, monkeypatch) -> None:
    crosses: list[tuple[Call, Call]] = []  # each cross_gramian call, one Call per batch
    real_cross_gramian = torchgram.cross_gramian

    def cross_gramian(fn, params, args_a, args_b, *, batch_dim=None, in_dims=0, **options):
        result = real_cross_gramian(
            fn, params, args_a, args_b, batch_dim=batch_dim, in_dims=in_dims, **options
        )
        a, b = (
            Call("cross_gramian", fn, _clone((params, *args)), 0, batch_dim, in_dims, result)
            for args in (args_a, args_b)
        )
        crosses.append((a, b))
        return result

    monkeypatch.setattr(torchgram, "cross_gramian", cross_gramian)
    path = tmp_path / "entk.png"
    result = load("empirical_ntk").main(path, n_train=200, n_test=100, width=16, n_check=4)
    assert result["ntk_train"].shape == (200, 10, 10, 200)
    assert result["ntk_test"].shape == (100, 10, 10, 200)
    assert result["reference"]["test"].shape == (4, 4, 10, 10)
    assert result["error"] < 1e-10  # against vmap(jacrev) + einsum, printed
    # Both kernels, whole, against per-sample gradients from vmap(grad), in float64.
    (call,) = recorded
    assert call.name == "gramian" and call.result is result["ntk_train"]
    J_train = assert_gramian(call, rtol=1e-10)  # rows (image, output)
    ((test, train),) = crosses
    assert test.result is result["ntk_test"] and torch.equal(train.args[1], call.args[1])
    J_test = jacobian(test)
    got = result["ntk_test"].permute(0, 1, 3, 2).reshape(len(J_test), len(J_train))
    expected = J_test @ J_train.T
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    # Kernel regression with the eNTK classifies the digits (chance: 0.1; measured 0.91 here,
    # 0.87 to 0.97 over eight seeds).
    assert result["accuracy"] > 0.8
    assert 0.5 < result["baseline"] < 1
    assert path.read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert str(path) in out and "linear kernel on pixels" in out


def test_functional_loop(recorded) -> None:
    result = load("functional_loop").main(n_samples=64, batch_size=16, epochs=2)
    assert len(recorded) == 2 * 4
    assert_direction(recorded[0])
    assert_direction(recorded[-1])
    assert result["last"] < result["first"]
    assert result["params"].keys() == result["initial"].keys()
    # Pure: the initial parameters were not changed in place (the loss there is still `first`).
    module = sys.modules["examples_functional_loop"]
    x, y = result["x"], result["y"]
    assert float(module.losses(result["initial"], x, y).mean()) == result["first"]


def test_ensemble() -> None:
    module = load("ensemble")
    result = module.main(n_members=3, n_samples=32, batch_size=8, epochs=2)
    assert result["member"].shape == (3,)
    # vmap over the members equals one jd_grad per member.
    params, x = result["params"], torch.randn(3, 6, 1)
    y = torch.sin(x[..., 0])
    batched = result["step"](params, x, y)
    step = module.torchgram.jd_grad(result["losses"], weightings.upgrad, batch_dim=0)
    for e in range(3):
        member = {k: v[e] for k, v in params.items()}
        single = step(member, x[e], y[e])
        for k in single:
            assert torch.allclose(batched[k][e], single[k], rtol=1e-3, atol=1e-5)
        # Each member's direction against Jᵀ upgrad(J Jᵀ) of its per-sample gradients.
        mine = {k: v[e] for k, v in batched.items()}
        assert_direction(Call("jd_grad", result["losses"], (member, x[e], y[e]), 0, 0, 0, mine))


def test_demo(tmp_path, capsys, recorded) -> None:
    path = tmp_path / "figures" / "demo.png"
    result = load("demo").main(epochs=3, subset=300, batch_size=16, output=path)
    assert path.read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert "epoch  3/3" in out and str(path) in out
    for name in ("upgrad", "sgd"):
        metrics, curve = result["metrics"][name], result["curves"][name]["train"]
        assert curve[-1] < curve[0]  # both learn
        assert metrics["train_acc"] > 0.3  # 10 classes: chance is 0.1
    cosine = result["cosine"]
    assert cosine.shape == (60, 60)
    # The cosines it draws, against those of the trained model's per-sample gradients from
    # vmap(grad) in float64; and its training steps against Jᵀ upgrad(J Jᵀ) of them.
    gramians = [call for call in recorded if call.name == "gramian"]
    steps = [call for call in recorded if call.name == "jd_grad"]
    assert len(gramians) == 1 and len(steps) == 3 * 15  # 240 training images, batches of 16
    J = assert_gramian(gramians[0])
    torch.testing.assert_close(cosine.to(D), cosines(J), rtol=0, atol=1e-5)
    assert_direction(steps[0])
    assert_direction(steps[-1])


def test_distributed_jd(tmp_path, capsys) -> None:
    """Two processes under torchrun (gloo) end with the parameters of the one-process run on
    the same global batches."""
    import subprocess

    steps = 6
    single = load("distributed_jd").main(steps=steps, log_every=3)
    assert "1 process(es): parameter checksum" in capsys.readouterr().out
    out = tmp_path / "two.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(EXAMPLES / "distributed_jd.py"), "--steps", str(steps), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es): parameter checksum" in result.stdout
    two = torch.load(out)
    assert single.keys() == two.keys()
    for key in single:
        assert torch.allclose(two[key], single[key], rtol=1e-10, atol=1e-12), key
    assert any(not torch.equal(two[k], load("distributed_jd").main(steps=0)[k]) for k in two)
