"""Kernel regression with the empirical NTK of a small CNN on scikit-learn's digits.

The empirical neural tangent kernel of a network ``f(params, x) -> [C]`` between two inputs is
the ``[C, C]`` matrix ``Θ(x, x')[a, b] = <d f(x)[a] / d params, d f(x')[b] / d params>``. For
outputs ``[N, C]`` on a batch, ``torchgram.gramian(f, params, x, batch_dim=0)`` is the
``[N, C, C, N]`` kernel of the batch with itself, and
``torchgram.cross_gramian(f, params, (x_test,), (x_train,), batch_dim=0)`` the
``[N_test, C, C, N_train]`` kernel between two batches.

The script takes a CNN with 10 outputs at its random initialisation (float64), computes both
kernels on 8x8 digit images (train x train and test x train), and uses the trace NTK
``K(x, x') = Σ_a Θ(x, x')[a, a]`` for kernel ridge regression on the one-hot labels: the
prediction for a test image is ``K_test_train (K_train + λI)⁻¹ Y`` (``Y`` centred), and its
argmax is the predicted digit. The trace is the usual scalar summary of the matrix-valued kernel
(the C outputs are exchangeable at a random initialisation, and the off-diagonal entries of the
``[C, C]`` blocks are smaller than the diagonal ones: the script prints their relative size), and
it keeps the regression one ``[N, N]`` solve instead of an ``[N·C, N·C]`` one. A linear-kernel ridge
regression on the pixels, with the same ridge, is the baseline. The kernels are checked against
the Jacobian contraction of the ``torch.func`` NTK tutorial (per-sample Jacobians from
``vmap(jacrev)``, then an einsum) on a few images, and both are drawn, sorted by class.

Run: python examples/empirical_ntk.py [output.png]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global figure state, PNGs render with Agg
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, jacrev, vmap

import torchgram

Tensor = torch.Tensor


def load(n_train: int, n_test: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Digits (1797 8x8 images, 10 classes) as ``[N, 1, 8, 8]`` float64 in [0, 1]: a random
    split into ``x_train, y_train, x_test, y_test``."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float64).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=generator)
    train, test = order[:n_train], order[n_train : n_train + n_test]
    return x[train], y[train], x[test], y[test]


def make_model(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    ).double()  # float64: the kernels and the Jacobian contraction agree to ~1e-15


def trace_ntk(ntk: Tensor) -> Tensor:
    """``[N_a, N_b]``: ``Σ_a Θ[:, a, a, :]`` of a kernel ``[N_a, C, C, N_b]``."""
    return ntk.diagonal(dim1=1, dim2=2).sum(-1)


def kernel_regression(
    K_train: Tensor, K_test_train: Tensor, y_train: Tensor, ridge: float
) -> Tensor:
    """Predicted labels ``[N_test]`` of kernel ridge regression on the one-hot labels, centred;
    ``λ = ridge · mean(diag K_train)``, so that ``ridge`` does not depend on the kernel's scale."""
    Y = nn.functional.one_hot(y_train).to(K_train.dtype)
    mean = Y.mean(0)
    identity = torch.eye(len(K_train), dtype=K_train.dtype)
    alpha = torch.linalg.solve(K_train + ridge * K_train.diagonal().mean() * identity, Y - mean)
    return (K_test_train @ alpha + mean).argmax(1)


def ntk_from_jacobians(f, params, x1: Tensor, x2: Tensor) -> Tensor:
    """``[N1, N2, C, C]``: the torch.func tutorial's Jacobian contraction."""

    def one(params, x):  # [C] for one input
        return f(params, x[None])[0]

    jac1 = vmap(jacrev(one), in_dims=(None, 0))(params, x1)  # {name: [N1, C, *p.shape]}
    jac2 = vmap(jacrev(one), in_dims=(None, 0))(params, x2)
    return sum(
        torch.einsum("naf,mbf->nmab", jac1[k].flatten(2), jac2[k].flatten(2)) for k in params
    )


def main(
    path: str | Path = "outputs/entk.png",
    n_train: int = 500,
    n_test: int = 300,
    width: int = 64,
    ridge: float = 1e-3,
    n_check: int = 8,
    seed: int = 0,
) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load(n_train, n_test, generator)
    model = make_model(width)
    params = {name: p.detach() for name, p in model.named_parameters()}
    n_params = sum(p.numel() for p in params.values())
    print(f"digits: {n_train} train and {n_test} test images; a CNN with {n_params} parameters")

    def f(params, x):  # [N, C]
        return functional_call(model, params, (x,))

    start = time.perf_counter()
    ntk_train = torchgram.gramian(f, params, x_train, batch_dim=0)  # [N_train, C, C, N_train]
    print(f"eNTK train x train {list(ntk_train.shape)}: {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    ntk_test = torchgram.cross_gramian(f, params, (x_test,), (x_train,), batch_dim=0)
    print(f"eNTK test x train  {list(ntk_test.shape)}: {time.perf_counter() - start:.1f}s")

    # The same entries from vmap(jacrev) + einsum, [n, m, a, b], on the first n_check images.
    reference = {
        "train": ntk_from_jacobians(f, params, x_train[:n_check], x_train[:n_check]),
        "test": ntk_from_jacobians(f, params, x_test[:n_check], x_train[:n_check]),
    }
    error = max(
        relative_difference(ntk[:n_check, :, :, :n_check].permute(0, 3, 1, 2), reference[name])
        for name, ntk in (("train", ntk_train), ("test", ntk_test))
    )
    print(f"max relative difference with vmap(jacrev) + einsum on {n_check} images: {error:.1e}")
    print(
        f"off-diagonal entries of the [C, C] blocks: {off_diagonal(ntk_train):.1%} of the "
        "diagonal ones (RMS)"
    )

    K_train, K_test_train = trace_ntk(ntk_train), trace_ntk(ntk_test)
    predicted = kernel_regression(K_train, K_test_train, y_train, ridge)
    pixels_train, pixels_test = x_train.flatten(1), x_test.flatten(1)
    linear = kernel_regression(
        pixels_train @ pixels_train.T, pixels_test @ pixels_train.T, y_train, ridge
    )
    accuracy, baseline = (float((y == y_test).double().mean()) for y in (predicted, linear))
    print(f"test accuracy of kernel ridge regression (ridge {ridge:g}) on {n_test} images:")
    print(f"  trace eNTK of the CNN    {accuracy:.3f}")
    print(f"  linear kernel on pixels  {baseline:.3f}")

    path = save_figure(path, K_train, K_test_train, y_train, y_test)
    print(f"saved {path}")
    return {
        "ntk_train": ntk_train,
        "ntk_test": ntk_test,
        "reference": reference,
        "error": error,
        "accuracy": accuracy,
        "baseline": baseline,
        "path": path,
    }


def relative_difference(ours: Tensor, theirs: Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def off_diagonal(ntk: Tensor) -> float:
    """The RMS of the off-diagonal entries of the ``[C, C]`` blocks of ``ntk [N, C, C, N]``
    relative to that of their diagonal entries."""
    C = ntk.shape[1]
    on = ntk.diagonal(dim1=1, dim2=2).square().sum()
    off = ntk.square().sum() - on
    return float((off / (C - 1)).sqrt() / on.sqrt())


def save_figure(
    output: str | Path, K_train: Tensor, K_test_train: Tensor, y_train: Tensor, y_test: Tensor
) -> Path:
    """Both trace kernels as heatmaps, images sorted by digit, lines between digits."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, columns = y_test.argsort(stable=True), y_train.argsort(stable=True)
    figure = Figure(figsize=(11, 4.6), layout="constrained")
    for axes, K, labels, name in (
        (figure.add_subplot(1, 2, 1), K_train[columns][:, columns], y_train[columns], "train"),
        (figure.add_subplot(1, 2, 2), K_test_train[rows][:, columns], y_test[rows], "test"),
    ):
        image = axes.imshow(K, cmap="viridis", aspect="auto", interpolation="nearest")
        figure.colorbar(image, ax=axes, shrink=0.85)
        _digit_axis(axes.yaxis, axes.axhline, labels)
        _digit_axis(axes.xaxis, axes.axvline, y_train[columns])
        axes.set(title=f"trace eNTK, {name} x train", xlabel="train image (by digit)")
        axes.set_ylabel(f"{name} image (by digit)")
    figure.savefig(path, dpi=110)
    return path


def _digit_axis(axis, line, labels: Tensor) -> None:
    """Ticks at the middle of each digit's block, and a line between blocks."""
    counts = torch.bincount(labels, minlength=10)
    ends = counts.cumsum(0)
    for end in ends[:-1].tolist():
        line(end - 0.5, color="w", linewidth=0.6)
    axis.set_ticks(((ends - counts / 2) - 0.5).tolist(), [str(d) for d in range(10)])


if __name__ == "__main__":
    main(*sys.argv[1:2])
