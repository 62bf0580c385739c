"""Quickstart: the Gramian of per-sample losses, and what it tells about the samples.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

import torchgram
from torchgram import weightings


def _table(matrix: torch.Tensor) -> str:
    return "\n".join(" ".join(f"{value:7.3f}" for value in row.tolist()) for row in matrix)


def main() -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    # Detached: G is the same (every leaf of params is a variable either way) and a plain tensor.
    # Leaves that require grad would make G carry an autograd graph back to them, which only
    # differentiating G itself needs, at a cost in memory and time.
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def losses(params, x, y):  # one loss per sample: [B]
        logits = functional_call(model, params, (x,))
        return nn.functional.cross_entropy(logits, y, reduction="none")

    G = torchgram.gramian(losses, params, x, y, batch_dim=0)  # [B, B]
    norms = G.diagonal().sqrt()  # per-sample gradient norms
    cosine = G / (norms[:, None] * norms[None, :])  # cosine similarity between sample gradients

    print("Gramian G = J Jᵀ of the per-sample losses, [B, B]:")
    print(_table(G))
    print("\nper-sample gradient norms sqrt(diag G):")
    print(_table(norms[None]))
    print("\ncosine similarity between per-sample gradients:")
    print(_table(cosine))
    conflicts = (cosine < 0).sum().item() // 2
    print(
        f"\n{conflicts} of {6 * 5 // 2} pairs of samples have conflicting gradients (cosine < 0)."
    )
    # Each UPGrad weight is at least the mean loss's 1/B, and more where gradients conflict, so
    # Jᵀw is on another scale than the mean gradient and a learning rate tuned for SGD on the mean
    # loss does not carry over: see "Choosing the learning rate" in docs/getting-started.md.
    w = weightings.upgrad(G)
    print(
        f"\nUPGrad weights, one per sample (the mean loss's are 1/6 each, summing to 1); these sum "
        f"to {w.sum():.3f}:"
    )
    print(_table(w[None]))
    return G


if __name__ == "__main__":
    main()
