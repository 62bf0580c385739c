"""Partial Jacobian descent: UPGrad on the last layers only, ordinary gradients elsewhere.

The Gramian only involves the parameters it is taken with respect to, so Jacobian descent can be
restricted to a subset of them: here the last two layers of an MLP (``argnums=0``) get the UPGrad
direction of the per-sample losses, and the first two the gradient of the mean loss. The
Gramian is then over a fraction of the parameters, which makes it cheaper. The other parameters
are an argument of ``fn`` without samples, so ``in_dims`` marks it ``None``.

Run: python examples/partial_jd.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad

import torchgram
from torchgram import weightings

Tensor = torch.Tensor
LATE = ("4.", "6.")  # name prefixes of the layers trained by Jacobian descent


def make_model() -> nn.Sequential:
    return nn.Sequential(
        *(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()),  # ordinary gradients
        *(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)),  # Jacobian descent
    )


def per_sample_losses(model: nn.Module) -> Callable[..., Tensor]:
    def losses(late, early, x, y):  # [B]
        logits = functional_call(model, {**early, **late}, (x,))
        return nn.functional.cross_entropy(logits, y, reduction="none")

    return losses


def split(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The detached parameters of the late layers and of the others."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    late = {k: v for k, v in params.items() if k.startswith(LATE)}
    return late, {k: v for k, v in params.items() if k not in late}


def partial_direction(model: nn.Module) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
    """``direction(x, y)``: UPGrad on the late layers, the mean loss's gradient on the others."""
    losses = per_sample_losses(model)
    # late: the JD parameters (argnums=0); early: no samples (None); x and y: samples on dim 0.
    late_step = torchgram.jd_grad(
        losses, weightings.upgrad, argnums=0, batch_dim=0, in_dims=(None, None, 0, 0)
    )
    early_grad = grad(lambda early, late, x, y: losses(late, early, x, y).mean())

    def direction(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        late, early = split(model)
        return {**late_step(late, early, x, y), **early_grad(early, late, x, y)}

    return direction


def main(
    n_samples: int = 512, batch_size: int = 32, epochs: int = 10, lr: float = 0.1, seed: int = 0
) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(n_samples, 10, generator=generator)
    y = (x[:, :4] + 0.5 * x[:, 4:8] ** 2).argmax(dim=1)  # 4 classes
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, direction = per_sample_losses(model), partial_direction(model)

    late, early = split(model)
    n_late = sum(p.numel() for p in late.values())
    n_all = n_late + sum(p.numel() for p in early.values())
    print(f"Jacobian descent on {sorted(late)}: {n_late} of {n_all} parameters")

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            accuracy = (model(x).argmax(dim=1) == y).float().mean()
            return float(losses(*split(model), x, y).mean()), float(accuracy)

    initial, _ = evaluate()
    history = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(n_samples, generator=generator).split(batch_size):
            optimizer.zero_grad()
            torchgram.set_grad(model, direction(x[batch], y[batch]))
            optimizer.step()
        history.append(evaluate())
        loss, accuracy = history[-1]
        print(
            f"epoch {epoch:3d}/{epochs}  mean loss {loss:.4f}  accuracy {accuracy:.1%}  "
            f"({time.perf_counter() - start:.1f}s)"
        )
    print(f"initial mean loss {initial:.4f}; final mean loss {loss:.4f}, accuracy {accuracy:.1%}")
    return {"initial": initial, "history": history}


if __name__ == "__main__":
    main()
