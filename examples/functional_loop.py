"""A pure functional training loop: a parameter pytree, no nn.Module, no optimiser object.

The parameters are a dict of tensors, the model a function of them, and one training step a
function from parameters to parameters: ``jd_grad`` gives the UPGrad direction of the per-sample
losses and ``optree.tree_map`` applies the SGD update. Nothing is mutated: the initial parameters
are still there at the end.

Run: python examples/functional_loop.py
"""

from __future__ import annotations

import itertools
import math
import time

import optree
import torch

import torchgram
from torchgram import weightings

Tensor = torch.Tensor
Params = dict[str, Tensor]


def init(sizes: tuple[int, ...], generator: torch.Generator) -> Params:
    """An MLP's weights ``w{i}`` and biases ``b{i}``, scaled like ``nn.Linear``'s initialisation."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        bound = 1 / math.sqrt(fan_in)
        params[f"w{i}"] = (2 * torch.rand(fan_in, fan_out, generator=generator) - 1) * bound
        params[f"b{i}"] = (2 * torch.rand(fan_out, generator=generator) - 1) * bound
    return params


def predict(params: Params, x: Tensor) -> Tensor:
    layers = len(params) // 2
    for i in range(layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            x = torch.tanh(x)
    return x.squeeze(-1)


def losses(params: Params, x: Tensor, y: Tensor) -> Tensor:  # [B]
    return (predict(params, x) - y) ** 2


def make_step(lr: float):
    """``step(params, x, y) -> params``: one UPGrad step of Jacobian descent, a pure function."""
    direction = torchgram.jd_grad(losses, weightings.upgrad, batch_dim=0)

    def step(params: Params, x: Tensor, y: Tensor) -> Params:
        return optree.tree_map(lambda p, d: p - lr * d, params, direction(params, x, y))

    return step


def main(
    n_samples: int = 512, batch_size: int = 32, epochs: int = 10, lr: float = 0.1, seed: int = 0
) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n_samples, 1, generator=generator) * 6 - 3
    y = torch.sin(2 * x[:, 0]) + 0.3 * x[:, 0]
    initial = init((1, 32, 32, 1), generator)
    step = make_step(lr)

    params = initial
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(n_samples, generator=generator).split(batch_size):
            params = step(params, x[batch], y[batch])
        print(
            f"epoch {epoch:3d}/{epochs}  mean loss {losses(params, x, y).mean():.4f}  "
            f"({time.perf_counter() - start:.1f}s)"
        )
    first, last = (float(losses(p, x, y).mean()) for p in (initial, params))
    print(f"mean loss: {first:.4f} at the initial parameters (unchanged), {last:.4f} at the end")
    return {"initial": initial, "params": params, "first": first, "last": last, "x": x, "y": y}


if __name__ == "__main__":
    main()
