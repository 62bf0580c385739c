"""An ensemble trained with ``torch.func.vmap``: every member takes its own UPGrad step at once.

``torch.func.stack_module_state`` stacks the parameters of E copies of a model (each leaf gets a
leading dimension E), and ``vmap(jd_grad(...))`` computes all E Jacobian-descent directions in one
call: the Gramians ``[E, B, B]``, the UPGrad weights and the directions are batched over the
members. Each member sees its own bootstrap resample of each batch.

Run: python examples/ensemble.py
"""

from __future__ import annotations

import copy
import time

import optree
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import torchgram
from torchgram import weightings


def main(
    n_members: int = 4,
    n_samples: int = 256,
    batch_size: int = 16,
    epochs: int = 5,
    lr: float = 0.05,
    seed: int = 0,
) -> dict[str, object]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.rand(n_samples, 1, generator=generator) * 6 - 3
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n_samples, generator=generator)
    members = [
        nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)) for _ in range(n_members)
    ]
    params, _ = stack_module_state(members)  # {name: [E, *shape]}
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(members[0]).to("meta")  # the architecture only

    def losses(params, x, y):  # [B], for one member
        return (functional_call(base, params, (x,)).squeeze(-1) - y) ** 2

    # vmap over the members: parameters and data both have a leading member dimension.
    step = vmap(torchgram.jd_grad(losses, weightings.upgrad, batch_dim=0))

    def ensemble_loss(params) -> tuple[torch.Tensor, float]:
        predictions = vmap(functional_call, in_dims=(None, 0, None))(
            base, params, (x,)
        )  # [E, N, 1]
        member = ((predictions.squeeze(-1) - y) ** 2).mean(dim=1)
        return member, float(((predictions.mean(dim=0).squeeze(-1) - y) ** 2).mean())

    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(n_samples, generator=generator).split(batch_size):
            resample = batch[
                torch.randint(0, len(batch), (n_members, len(batch)), generator=generator)
            ]
            direction = step(params, x[resample], y[resample])  # {name: [E, *shape]}
            params = optree.tree_map(lambda p, d: p - lr * d, params, direction)
        member, ensemble = ensemble_loss(params)
        print(
            f"epoch {epoch:3d}/{epochs}  member losses "
            f"[{', '.join(f'{v:.4f}' for v in member.tolist())}]  ensemble {ensemble:.4f}  "
            f"({time.perf_counter() - start:.1f}s)"
        )
    return {
        "params": params,
        "step": step,
        "losses": losses,
        "member": member,
        "ensemble": ensemble,
    }


if __name__ == "__main__":
    main()
