"""Instance-wise risk minimisation: UPGrad on the per-sample losses, against SGD on their mean.

Each sample's loss is an objective of its own. SGD follows the gradient of their mean, which can
raise the loss of some samples of the batch; UPGrad combines the per-sample gradients into a
direction that conflicts with none of them (to first order, no sample's loss goes up). Both
methods start from the same initialisation and use the same learning rate and batches. UPGrad's
weights sum to more than 1 where gradients conflict (each is at least 1/B), so its direction is on
another scale than the mean gradient and one learning rate does not mean equal steps: see
"Choosing the learning rate" in docs/getting-started.md.

Run: python examples/instance_wise_upgrad.py
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.func import functional_call, jvp

import torchgram
from torchgram import weightings


def make_data(n_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-D regression target with two regimes, so that samples pull in different directions."""
    x = torch.randn(n_samples, 8, generator=generator)
    y = torch.where(x[:, 0] > 0, torch.sin(2 * x[:, 1]), -x[:, 2]) + 0.1 * torch.randn(
        n_samples, generator=generator
    )
    return x, y


def per_sample_losses(model: nn.Module):
    """``losses(params, x, y) -> [B]``: the squared error of every sample."""

    def losses(params, x, y):
        return (functional_call(model, params, (x,)).squeeze(-1) - y) ** 2

    return losses


def detached(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def main(
    n_samples: int = 1024, batch_size: int = 32, epochs: int = 10, lr: float = 0.05, seed: int = 0
) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = make_data(n_samples, generator)
    models = {"upgrad": nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))}
    models["sgd"] = copy.deepcopy(models["upgrad"])  # the same initialisation
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=lr) for name, m in models.items()}
    losses = {name: per_sample_losses(m) for name, m in models.items()}
    jd_step = torchgram.jd_grad(losses["upgrad"], weightings.upgrad, batch_dim=0)

    # Along the UPGrad direction d = Jᵀw, sample i's loss falls at rate (J d)_i = (G w)_i (the
    # step is -lr * d). upgrad guarantees (J d)_i >= -reg_eps * trace(G) * w_i: its regularisation
    # is the only slack, and 1e-5 more allows for float32 rounding in the jvp.
    params, xb, yb = detached(models["upgrad"]), x[:batch_size], y[:batch_size]
    direction = jd_step(params, xb, yb)
    _, slopes = jvp(lambda p: losses["upgrad"](p, xb, yb), (params,), (direction,))
    G = torchgram.gramian(losses["upgrad"], params, xb, yb, batch_dim=0)
    reg_eps = 1e-4  # upgrad's default
    slack = -reg_eps * G.trace() * weightings.upgrad(G)
    lowest = int(slopes.argmin())
    print(
        f"first UPGrad step: sample i's loss falls at rate (J d)_i along the direction d; over "
        f"the\nbatch of {len(xb)} the rates run from {float(slopes.min()):.4g} to "
        f"{float(slopes.max()):.4g}. Negative rates are the slack that upgrad's\n"
        f"regularisation allows, (J d)_i >= -reg_eps·trace(G)·w_i: {float(slack[lowest]):.4g} "
        f"for the sample at {float(slopes[lowest]):.4g}.\n"
        f"Every sample within that bound (non-conflicting up to the regularisation): "
        f"{bool((slopes >= slack - 1e-5).all())}"
    )

    with torch.no_grad():
        initial = float(losses["sgd"](detached(models["sgd"]), x, y).mean())
    history: dict[str, list[float]] = {"upgrad": [], "sgd": []}
    raised = {"upgrad": 0, "sgd": 0}  # samples of the batch whose loss went up after a step
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n_samples, generator=generator)
        for batch in order.split(batch_size):
            xb, yb = x[batch], y[batch]
            for name, model in models.items():
                with torch.no_grad():
                    before = losses[name](detached(model), xb, yb)
                optimizers[name].zero_grad()
                if name == "upgrad":
                    torchgram.set_grad(model, jd_step(detached(model), xb, yb))
                else:
                    losses[name](dict(model.named_parameters()), xb, yb).mean().backward()
                optimizers[name].step()
                with torch.no_grad():
                    raised[name] += int((losses[name](detached(model), xb, yb) > before).sum())
        for name, model in models.items():
            with torch.no_grad():
                history[name].append(float(losses[name](detached(model), x, y).mean()))
        print(
            f"epoch {epoch:3d}/{epochs}  mean loss: UPGrad {history['upgrad'][-1]:.4f}  "
            f"SGD {history['sgd'][-1]:.4f}  ({time.perf_counter() - start:.1f}s)"
        )

    with torch.no_grad():
        worst = {name: float(losses[name](detached(m), x, y).max()) for name, m in models.items()}
    print(f"initial mean loss {initial:.4f}")
    for name, label in (("upgrad", "UPGrad"), ("sgd", "SGD")):
        print(
            f"{label:>6}: mean loss {history[name][-1]:.4f}, worst sample {worst[name]:.4f}, "
            f"{raised[name] / (epochs * n_samples):.1%} of per-sample losses went up on their step"
        )
    return {
        "initial": initial,
        "history": history,
        "worst": worst,
        "raised": raised,
        "first_slopes": slopes,
        "first_slack": slack,
    }


if __name__ == "__main__":
    main()
