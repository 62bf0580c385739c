"""Every example runs with tiny sizes and shows what it claims to show."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch.func import jacrev

from torchgram import weightings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested() -> None:
    tested = {
        name.removeprefix("test_").split("__")[0]
        for name in globals()
        if name.startswith("test_") and name != "test_every_example_is_tested"
    }
    scripts = {path.stem for path in EXAMPLES.glob("*.py")}
    assert scripts <= tested, f"examples without a test: {sorted(scripts - tested)}"


def test_quickstart(capsys) -> None:
    G = load("quickstart").main()
    assert G.shape == (6, 6)
    assert torch.allclose(G, G.T) and bool((torch.linalg.eigvalsh(G) > -1e-5).all())
    assert "conflicting gradients" in capsys.readouterr().out


def test_instance_wise_upgrad() -> None:
    result = load("instance_wise_upgrad").main(n_samples=96, batch_size=16, epochs=2)
    assert bool((result["first_slopes"] >= result["first_slack"] - 1e-5).all())
    for name in ("upgrad", "sgd"):
        assert result["history"][name][-1] < result["initial"]
    # Non-conflicting steps raise fewer per-sample losses than steps along the mean gradient.
    assert result["raised"]["upgrad"] < result["raised"]["sgd"]


def test_multi_task() -> None:
    result = load("multi_task").main(n_samples=64, batch_size=32, epochs=3)
    assert result["first_slopes"].shape == (3,)
    assert bool((result["first_slopes"] > 0).all())  # the trunk step helps every task
    for name in ("upgrad", "mean"):
        assert bool((result["final"][name] < result["initial"]).all())


def test_instance_wise_multi_task(capsys) -> None:
    result = load("instance_wise_multi_task").main(n_samples=32, batch_size=8, epochs=2)
    assert result["gramian"].shape == (8, 3, 3, 8)
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


def test_monitoring(tmp_path, capsys) -> None:
    path = tmp_path / "monitoring.png"
    result = load("monitoring").main(path, n_samples=60, batch_size=12, epochs=1)
    assert path.read_bytes().startswith(b"\x89PNG")
    assert str(path) in capsys.readouterr().out
    # Norms against explicit per-sample gradients; cosines on the diagonal are 1.
    cosine, norms = result["cosine"], result["norms"]
    assert torch.allclose(cosine.diagonal(), torch.ones(12), atol=1e-5)
    assert bool((cosine.abs() <= 1 + 1e-5).all())
    G = result["gramian"]
    assert torch.allclose(norms**2, G.diagonal(), rtol=1e-5)
    same = result["labels"][:, None] == result["labels"][None, :]
    assert cosine[same].mean() > cosine[~same].mean()  # what the heatmap shows


def test_dp_sgd(capsys) -> None:
    module = load("dp_sgd")
    result = module.main(n_samples=64, batch_size=16, epochs=1)
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


def test_empirical_ntk() -> None:
    result = load("empirical_ntk").main(n1=3, n2=4, width=8)
    assert result["ntk"].shape == (3, 4, 10, 10)
    assert result["error"] < 1e-10


def test_functional_loop() -> None:
    result = load("functional_loop").main(n_samples=64, batch_size=16, epochs=2)
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
        single = step({k: v[e] for k, v in params.items()}, x[e], y[e])
        for k in single:
            assert torch.allclose(batched[k][e], single[k], rtol=1e-3, atol=1e-5)


def test_demo(tmp_path, capsys) -> None:
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
    assert torch.allclose(cosine.diagonal(), torch.ones(60), atol=1e-5)
