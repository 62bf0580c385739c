"""Data-parallel Jacobian descent: the batch spread over processes, one direction for all.

Each process (rank) holds a shard of every batch, as with DistributedDataParallel. With
``group=``, ``torchgram.jd_grad`` computes the Gramian of the whole batch (every sample against
every other, the blocks between ranks included), weights it with UPGrad, and returns the same
direction ``Jᵀw`` on every rank, so every rank's optimiser takes the same step and the replicas
stay equal, as DDP's averaged gradient keeps them.

Run with two processes (gloo on the CPU):

    torchrun --nproc-per-node 2 examples/distributed_jd.py

or in one process, the run the distributed one must match (the same global batches in another
order; UPGrad does not depend on the order of the rows):

    python examples/distributed_jd.py

The model is not wrapped in ``DistributedDataParallel``: DDP would all-reduce the gradients of a
``backward()`` call, and this loop makes none; ``jd_grad`` already returns the global direction,
which ``set_grad`` writes into ``.grad`` for the optimiser. What DDP does besides, sending rank 0's
parameters to the others at the start, is done here with ``broadcast``.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchgram


def dataset(samples: int = 512, seed: int = 0) -> TensorDataset:
    """A regression task with one noisy input region (a source of conflicting gradients)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=generator, dtype=torch.float64)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3]
    y = y + 0.3 * (x[:, 3:4] > 1) * torch.randn(samples, 1, generator=generator, dtype=x.dtype)
    return TensorDataset(x, y)


def main(
    steps: int = 60, global_batch: int = 32, lr: float = 0.05, seed: int = 0, log_every: int = 10
) -> dict[str, torch.Tensor]:
    distributed = dist.is_available() and "RANK" in os.environ  # set by torchrun
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    group = dist.group.WORLD if distributed else None
    if global_batch % world:
        raise ValueError(f"global_batch={global_batch} must be a multiple of {world} ranks")

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    if distributed:  # every replica starts from rank 0's parameters, as DDP does
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    data = dataset(seed=seed)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(data, batch_size=global_batch // world, sampler=sampler, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def losses(params, x, y):  # [B]: one loss per sample of this rank's shard
        return (functional_call(model, params, (x,)) - y).pow(2).squeeze(-1)

    step_fn = torchgram.jd_grad(losses, torchgram.weightings.upgrad, batch_dim=0, group=group)
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            params = {k: v.detach() for k, v in model.named_parameters()}
            direction = step_fn(params, x, y)  # the same on every rank
            torchgram.set_grad(model, direction)
            optimizer.step()
            step += 1
            if step % log_every == 0 or step == steps:
                loss = _mean_loss(model, data)
                if rank == 0:
                    print(f"step {step:3d}  mean loss over the data set {loss:.5f}", flush=True)
            if step == steps:
                break
        epoch += 1
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        checksum = sum(float(v.sum()) for v in final.values())
        print(f"{world} process(es): parameter checksum {checksum:.12f}")
    return final


def _mean_loss(model: nn.Module, data: TensorDataset) -> float:
    """The mean loss over the whole data set (each replica holds the same parameters)."""
    with torch.no_grad():
        x, y = data.tensors
        return float((model(x) - y).pow(2).mean())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", help="save rank 0's final parameters to this file")
    arguments = parser.parse_args()
    result = main(steps=arguments.steps)
    if arguments.out and (not dist.is_initialized() or dist.get_rank() == 0):
        torch.save(result, arguments.out)
    if dist.is_initialized():
        # Free what the collectives used before leaving the group: freed during interpreter
        # shutdown instead, torch 2.13's gloo aborts the process now and then.
        del result
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
