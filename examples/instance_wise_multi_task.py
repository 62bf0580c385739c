"""Instance-wise multi-task learning: one objective per (sample, task) pair.

The model predicts K targets for each sample, and the loss is kept per sample and per task: a
``[B, K]`` output. With ``batch_dim=0`` its Gramian is the generalized Gramian ``[B, K, K, B]``
(``G[i, k, l, j]`` is the inner product of the gradients of loss ``(i, k)`` and loss ``(j, l)``),
UPGrad turns it into weights ``[B, K]``, and the update conflicts with none of the B·K losses.

Run: python examples/instance_wise_multi_task.py
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.func import functional_call, jvp

import torchgram
from torchgram import weightings


def make_data(
    n_samples: int, n_tasks: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n_samples, 6, generator=generator)
    mixing = torch.randn(6, n_tasks, generator=generator)
    return x, torch.tanh(x @ mixing) + 0.3 * torch.cos(3 * x[:, :1])


def main(
    n_samples: int = 256,
    n_tasks: int = 3,
    batch_size: int = 16,
    epochs: int = 10,
    lr: float = 0.1,
    seed: int = 0,
) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = make_data(n_samples, n_tasks, generator)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, n_tasks))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def losses(params, x, y):  # [B, K]: one loss per sample and task
        return (functional_call(model, params, (x,)) - y) ** 2

    def detached() -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in model.named_parameters()}

    # One batch, step by step: the generalized Gramian, the weights, the direction.
    params, xb, yb = detached(), x[:batch_size], y[:batch_size]
    out, vjp_fn, G = torchgram.vjp_and_gramian(losses, params, xb, yb, batch_dim=0)
    w = weightings.upgrad(G)
    direction = vjp_fn(w)
    _, slopes = jvp(lambda p: losses(p, xb, yb), (params,), (direction,))
    print(f"losses {list(out.shape)}, Gramian {list(G.shape)}, weights {list(w.shape)}")
    print(f"G[i, k, l, j] == flatten(G)[i*K + k, j*K + l]: {_layout_holds(G)}")
    # Along the step, loss (i, k) changes at rate (G w)[i, k] >= -reg_eps * trace(G) * w[i, k]:
    # no conflict, up to the slack of upgrad's regularisation (reg_eps=1e-4).
    slack = -1e-4 * torchgram.flatten(G).trace() * w
    print(
        f"smallest rate of change of a (sample, task) loss along the step: {slopes.min():.3g}; "
        f"conflict-free up to upgrad's slack: {bool((slopes >= slack - 1e-5).all())}"
    )

    step = torchgram.jd_grad(losses, weightings.upgrad, batch_dim=0)
    with torch.no_grad():
        initial = losses(detached(), x, y)
    history = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(n_samples, generator=generator).split(batch_size):
            optimizer.zero_grad()
            torchgram.set_grad(model, step(detached(), x[batch], y[batch]))
            optimizer.step()
        with torch.no_grad():
            history.append(losses(detached(), x, y).mean(dim=0))
        print(
            f"epoch {epoch:3d}/{epochs}  mean loss per task "
            f"[{', '.join(f'{v:.4f}' for v in history[-1].tolist())}]  "
            f"({time.perf_counter() - start:.1f}s)"
        )
    print(f"initial mean loss per task {[round(v, 4) for v in initial.mean(dim=0).tolist()]}")
    return {
        "gramian": G,
        "weights": w,
        "first_slopes": slopes,
        "first_slack": slack,
        "initial": initial.mean(dim=0),
        "history": history,
    }


def _layout_holds(G: torch.Tensor) -> bool:
    """Entry ``G[i, k, l, j]`` of the generalized Gramian is row ``(i, k)``, column ``(j, l)``."""
    B, K = G.shape[:2]
    flat = torchgram.flatten(G)
    return all(
        bool(G[i, k, l, j] == flat[i * K + k, j * K + l])
        for i in range(B)
        for j in range(B)
        for k in range(K)
        for l in range(K)  # noqa: E741
    )


if __name__ == "__main__":
    main()
