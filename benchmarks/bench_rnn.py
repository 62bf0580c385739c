"""Recurrent layers: torchgram's Gramian against the per-sample-gradient recipe, in one run.

Run ``python benchmarks/bench_rnn.py``. The fused recurrent kernels have no ``vmap`` batching rule,
so the per-sample recipe here is a loop of ``torch.func.grad`` over the samples, then ``J @ J.T``
(TorchJD's engine refuses recurrent layers with ``batch_dim``). Times are medians, as ratios to one
forward and backward pass of the mean loss (the step). CPU, 2 threads.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _timing import median_time
from torch import nn
from torch.func import functional_call, grad

import torchgram


class _Tagger(nn.Module):
    def __init__(self, cell: type[nn.Module], width: int) -> None:
        super().__init__()
        self.rnn = cell(width, width, batch_first=True)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0]).squeeze(-1).pow(2).mean(-1)  # [B]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"B={args.batch}, T={args.steps}, width={args.width}, 2 threads")
    print("| layer | step (ms) | torchgram | per-sample loop |\n|---|---:|---:|---:|")
    for cell in (nn.RNN, nn.GRU, nn.LSTM):
        model = _Tagger(cell, args.width)
        x = torch.randn(args.batch, args.steps, args.width)
        reference, ours, theirs = _compare(model, x, args.repeats)
        print(
            f"| {cell.__name__} | {reference * 1e3:.1f} | {ours / reference:.2f}x "
            f"| {theirs / reference:.2f}x |"
        )


def _compare(model: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Median times of the step, torchgram's Gramian and the per-sample loop."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x,))

    def step() -> Any:
        return torch.autograd.grad(model(x).mean(), list(model.parameters()))

    def recipe() -> torch.Tensor:
        one = grad(lambda p, xi: fn(p, xi[None])[0])
        rows = [torch.cat([g.reshape(-1) for g in one(params, xi).values()]) for xi in x]
        J = torch.stack(rows)
        return J @ J.T

    return (
        median_time(step, repeats),
        median_time(lambda: torchgram.gramian(fn, params, x, batch_dim=0), repeats),
        median_time(recipe, repeats),
    )


if __name__ == "__main__":
    main()
