"""Monitoring: per-sample gradient norms and gradient similarities, read off the Gramian.

The Gramian ``G = J Jᵀ`` of the per-sample losses holds every inner product between per-sample
gradients: ``sqrt(G[i, i])`` is the gradient norm of sample i and
``G[i, j] / sqrt(G[i, i] G[j, j])`` the cosine similarity of samples i and j, without ever forming
the gradients themselves. This example trains a classifier for a few epochs, then draws the
cosine similarities of one batch, sorted by class, as a heatmap (saved as a PNG) with the
per-sample gradient norms beside it.

Run: python examples/monitoring.py [output.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global figure state, PNGs render with Agg
from torch import nn
from torch.func import functional_call

import torchgram


def make_data(n_samples: int, n_classes: int, generator: torch.Generator):
    """Gaussian blobs, one per class, that overlap a little."""
    centres = 2.0 * torch.randn(n_classes, 2, generator=generator)
    y = torch.randint(0, n_classes, (n_samples,), generator=generator)
    return centres[y] + torch.randn(n_samples, 2, generator=generator), y


def gradient_statistics(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradient norms ``[B]`` and cosine similarities ``[B, B]`` from ``G [B, B]``."""
    norms = G.diagonal().clamp(min=0).sqrt()
    scale = norms.clamp(min=torch.finfo(G.dtype).tiny)
    return norms, G / (scale[:, None] * scale[None, :])


def main(
    path: str | Path = "outputs/monitoring.png",
    n_samples: int = 600,
    n_classes: int = 3,
    batch_size: int = 48,
    epochs: int = 5,
    seed: int = 0,
) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = make_data(n_samples, n_classes, generator)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, n_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def losses(params, x, y):  # [B]
        return nn.functional.cross_entropy(
            functional_call(model, params, (x,)), y, reduction="none"
        )

    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(n_samples, generator=generator).split(batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            print(f"epoch {epoch}/{epochs}  loss {nn.functional.cross_entropy(model(x), y):.4f}")

    order = y[:batch_size].argsort(stable=True)  # group the samples of one batch by class
    xb, yb = x[:batch_size][order], y[:batch_size][order]
    params = {name: p.detach() for name, p in model.named_parameters()}
    G = torchgram.gramian(losses, params, xb, yb, batch_dim=0)  # [B, B]
    norms, cosine = gradient_statistics(G)
    same = yb[:, None] == yb[None, :]
    print(
        f"per-sample gradient norms: min {norms.min():.3g}, median {norms.median():.3g}, "
        f"max {norms.max():.3g}"
    )
    print(
        f"mean cosine similarity: same class {cosine[same].mean():.3f}, "
        f"different classes {cosine[~same].mean():.3f}"
    )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    heat, bars = figure.subplots(1, 2, width_ratios=(1.2, 1))
    image = heat.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    figure.colorbar(image, ax=heat, label="cosine similarity")
    boundaries = (torch.nonzero(yb[1:] != yb[:-1]).flatten() + 0.5).tolist()
    for b in boundaries:
        heat.axhline(b, color="k", linewidth=0.8)
        heat.axvline(b, color="k", linewidth=0.8)
    heat.set(title="per-sample gradients, sorted by class", xlabel="sample", ylabel="sample")
    bars.bar(range(len(norms)), norms, color=[f"C{int(c)}" for c in yb])
    bars.set(title="per-sample gradient norm sqrt(G[i, i])", xlabel="sample (colour: class)")
    bars.set_yscale("log")
    figure.savefig(path, dpi=120)
    print(f"saved {path}")
    return {"path": path, "gramian": G, "norms": norms, "cosine": cosine, "labels": yb}


if __name__ == "__main__":
    main(*sys.argv[1:2])
