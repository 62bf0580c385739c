"""Multi-task learning: Jacobian descent on a shared trunk, ordinary gradients on the task heads.

K regression tasks share a trunk and each has its own linear head. The trunk receives the
UPGrad combination of the K task gradients (the Gramian is over the vector of K task losses:
``batch_dim=None``, the rows are tasks, not samples), so its update does not favour one task at
the expense of another; each head only affects its own loss and gets its ordinary gradient.
Both directions are written into ``.grad`` with ``torchgram.set_grad`` and one ``torch.optim``
optimiser steps. A baseline trains the same initialisation with SGD on the averaged loss.

Run: python examples/multi_task.py
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

import torchgram
from torchgram import weightings


class MultiTask(nn.Module):
    def __init__(self, n_features: int, n_tasks: int, width: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(n_features, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.heads = nn.Linear(width, n_tasks)  # K heads of one output each, stored together

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(x))  # [B, K]


def make_data(
    n_samples: int, n_tasks: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """K targets built from overlapping features, some with opposite signs (conflicting tasks)."""
    x = torch.randn(n_samples, 8, generator=generator)
    mixing = torch.randn(8, n_tasks, generator=generator)
    y = torch.sin(x @ mixing) + 0.5 * (x[:, :1] ** 2) * torch.linspace(-1, 1, n_tasks)
    return x, y


def task_losses(model: nn.Module):
    """``losses(trunk, heads, x, y) -> [K]``: the mean squared error of each task."""

    def losses(trunk, heads, x, y):
        params = {**trunk, **heads}
        return ((functional_call(model, params, (x,)) - y) ** 2).mean(dim=0)

    return losses


def split(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The detached parameters of the trunk and of the heads, named as in the model."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    trunk = {k: v for k, v in params.items() if k.startswith("trunk.")}
    heads = {k: v for k, v in params.items() if k.startswith("heads.")}
    return trunk, heads


def main(
    n_samples: int = 512,
    n_tasks: int = 3,
    batch_size: int = 64,
    epochs: int = 30,
    lr: float = 0.3,
    seed: int = 0,
) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = make_data(n_samples, n_tasks, generator)
    jd_model = MultiTask(x.shape[1], n_tasks)
    mean_model = copy.deepcopy(jd_model)
    losses = task_losses(jd_model)  # the same function serves both models: params are arguments
    # The trunk is argument 0: the Gramian is [K, K], one row per task loss.
    trunk_step = torchgram.jd_grad(losses, weightings.upgrad, argnums=0)
    # Head k only affects loss k: its gradient is the same whatever the weights of the other tasks.
    heads_grad = grad(lambda heads, trunk, x, y: losses(trunk, heads, x, y).mean())

    def jd_update(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor]:
        trunk, heads = split(jd_model)
        return {**trunk_step(trunk, heads, xb, yb), **heads_grad(heads, trunk, xb, yb)}

    # Along the trunk's direction d, task k's loss changes at rate (J d)_k >= 0 (up to upgrad's
    # regularisation): no task is sacrificed to first order.
    trunk, heads = split(jd_model)
    direction = trunk_step(trunk, heads, x, y)
    _, slopes = jvp(lambda t: losses(t, heads, x, y), (trunk,), (direction,))
    print(
        f"first trunk step: task k's loss falls at rate (J d)_k along the trunk's direction d:\n"
        f"  {', '.join(f'{v:.4g}' for v in slopes.tolist())}; all positive (the step lowers "
        f"every task's loss, to first order): {bool((slopes > 0).all())}\n"
    )

    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in (jd_model, mean_model)]
    with torch.no_grad():
        initial = losses(*split(jd_model), x, y)
    tasks = " ".join(f"{f'task {k + 1}':>7}" for k in range(n_tasks))
    print(f"{'task losses':<11}  {'UPGrad on the trunk':<{len(tasks)}}   SGD on the mean")
    print(f"{'epoch':<11}  {tasks}   {tasks}")
    print(f"{'initial':<11}  {_row(initial)}   {_row(initial)}")
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(n_samples, generator=generator).split(batch_size):
            xb, yb = x[batch], y[batch]
            for optimizer in optimizers:
                optimizer.zero_grad()
            torchgram.set_grad(jd_model, jd_update(xb, yb))
            ((mean_model(xb) - yb) ** 2).mean().backward()  # the baseline: the mean task loss
            for optimizer in optimizers:
                optimizer.step()
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs:
            with torch.no_grad():
                jd, averaged = (losses(*split(m), x, y) for m in (jd_model, mean_model))
            print(
                f"{f'{epoch:3d}/{epochs}':<11}  {_row(jd)}   {_row(averaged)}  "
                f"({time.perf_counter() - start:.1f}s)"
            )
    with torch.no_grad():
        final = {"upgrad": losses(*split(jd_model), x, y), "mean": losses(*split(mean_model), x, y)}
    print(
        f"worst task at the end: UPGrad {final['upgrad'].max():.4f}, "
        f"SGD on the mean {final['mean'].max():.4f}"
    )
    return {"initial": initial, "final": final, "first_slopes": slopes}


def _row(values: torch.Tensor) -> str:
    """One loss per task, in columns as wide as the ``task k`` headers."""
    return " ".join(f"{v:7.4f}" for v in values.tolist())


if __name__ == "__main__":
    main()
