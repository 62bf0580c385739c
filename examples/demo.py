"""Demo: Jacobian descent (UPGrad, instance-wise) against SGD on scikit-learn's digits.

Trains the same small network twice from the same initialisation, with the same learning rate,
batches and epochs: once with SGD on the mean loss, once with Jacobian descent on the per-sample
losses (``torchgram.jd_grad(losses, torchgram.weightings.upgrad, batch_dim=0)``). Prints one line
per epoch, the final train/test metrics of both, and saves a figure with the loss curves and the
cosine similarities between the per-sample gradients of one test batch, read off its Gramian.

Run: pip install "torch==2.13.0" -e ".[demo]" && python examples/demo.py
Options: --epochs, --batch-size, --lr, --subset (fewer images), --output (the figure), --seed.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global figure state, PNGs render with Agg
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

import torchgram
from torchgram import weightings

Tensor = torch.Tensor
METHODS = {"upgrad": "UPGrad (Jacobian descent)", "sgd": "SGD (mean loss)"}


def load(subset: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits (1797 8x8 images, 10 classes) as ``[N, 64]`` in [0, 1], split 80/20 at random."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=generator)
    if subset is not None:
        order = order[:subset]
    n_test = len(order) // 5
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def per_sample_losses(model: nn.Module):
    def losses(params, x, y):  # [B]
        logits = functional_call(model, params, (x,))
        return nn.functional.cross_entropy(logits, y, reduction="none")

    return losses


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean loss and accuracy."""
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        return float(loss), float((logits.argmax(dim=1) == y).float().mean())


def gradient_cosines(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``[B, B]`` cosine similarities of the per-sample gradients, from the Gramian."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    G = torchgram.gramian(per_sample_losses(model), params, x, y, batch_dim=0)
    norms = G.diagonal().clamp(min=torch.finfo(G.dtype).tiny).sqrt()
    return G / (norms[:, None] * norms[None, :])


def main(
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.1,
    subset: int | None = None,
    output: str | Path = "outputs/demo.png",
    seed: int = 0,
) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load(subset, generator)
    print(
        f"digits: {len(x_train)} training and {len(x_test)} test images of 8x8 pixels, 10 classes"
    )
    initial = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    models = {name: copy.deepcopy(initial) for name in METHODS}  # the same initialisation
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=lr) for name, m in models.items()}
    jd_step = torchgram.jd_grad(per_sample_losses(models["upgrad"]), weightings.upgrad, batch_dim=0)
    curves: dict[str, dict[str, list[float]]] = {
        name: {"train": [], "test": []} for name in METHODS
    }
    times = dict.fromkeys(METHODS, 0.0)

    for name, model in models.items():  # epoch 0: the initialisation
        curves[name]["train"].append(evaluate(model, x_train, y_train)[0])
        curves[name]["test"].append(evaluate(model, x_test, y_test)[0])

    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(x_train), generator=generator).split(batch_size):
            xb, yb = x_train[batch], y_train[batch]
            for name, model in models.items():
                tick = time.perf_counter()
                optimizers[name].zero_grad()
                if name == "upgrad":
                    params = {k: p.detach() for k, p in model.named_parameters()}
                    torchgram.set_grad(model, jd_step(params, xb, yb))
                else:
                    nn.functional.cross_entropy(model(xb), yb).backward()
                optimizers[name].step()
                times[name] += time.perf_counter() - tick
        line = [f"epoch {epoch:2d}/{epochs}"]
        for name, model in models.items():
            (train_loss, _), (test_loss, test_acc) = (
                evaluate(model, x_train, y_train),
                evaluate(model, x_test, y_test),
            )
            curves[name]["train"].append(train_loss)
            curves[name]["test"].append(test_loss)
            line.append(f"{name}: loss {train_loss:.4f} test acc {test_acc:6.1%}")
        print("  ".join(line) + f"  ({time.perf_counter() - start:.1f}s)", flush=True)

    metrics = {}
    print(f"\n{'':28s}{'train loss':>11s}{'train acc':>11s}{'test loss':>11s}{'test acc':>10s}")
    for name, model in models.items():
        (train_loss, train_acc), (test_loss, test_acc) = (
            evaluate(model, x_train, y_train),
            evaluate(model, x_test, y_test),
        )
        metrics[name] = {
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
        }
        print(
            f"{METHODS[name]:28s}{train_loss:11.4f}{train_acc:11.1%}{test_loss:11.4f}"
            f"{test_acc:10.1%}   ({times[name]:.1f}s of training)"
        )

    # One test batch, grouped by class, seen by the network trained with Jacobian descent.
    order = y_test[:64].argsort(stable=True)
    cosine = gradient_cosines(models["upgrad"], x_test[:64][order], y_test[:64][order])
    path = save_figure(output, curves, cosine, y_test[:64][order])
    print(f"\nsaved the figure to {path}  (total {time.perf_counter() - start:.1f}s)")
    return {"metrics": metrics, "curves": curves, "cosine": cosine, "path": path}


def save_figure(
    output: str | Path, curves: dict[str, dict[str, list[float]]], cosine: Tensor, labels: Tensor
) -> Path:
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    losses, heat = figure.subplots(1, 2)
    for i, (name, label) in enumerate(METHODS.items()):
        epochs = range(len(curves[name]["train"]))
        losses.plot(epochs, curves[name]["train"], color=f"C{i}", label=f"{label}, train")
        losses.plot(epochs, curves[name]["test"], "--", color=f"C{i}", label=f"{label}, test")
    losses.set(title="cross-entropy on digits", xlabel="epoch", ylabel="mean loss", yscale="log")
    losses.legend()
    image = heat.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    figure.colorbar(image, ax=heat, label="cosine similarity")
    ticks = [int(torch.nonzero(labels == c)[0]) for c in labels.unique()]
    heat.set_xticks(ticks, [str(int(labels[t])) for t in ticks])
    heat.set_yticks(ticks, [str(int(labels[t])) for t in ticks])
    heat.set(
        title="per-sample gradients of one test batch (UPGrad model)",
        xlabel="sample (grouped by digit)",
        ylabel="sample (grouped by digit)",
    )
    figure.savefig(path, dpi=120)
    return path


def _arguments() -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--subset", type=int, default=None, help="use only this many images")
    parser.add_argument("--output", default="outputs/demo.png", help="where to save the figure")
    parser.add_argument("--seed", type=int, default=0)
    return vars(parser.parse_args())


if __name__ == "__main__":
    main(**_arguments())
