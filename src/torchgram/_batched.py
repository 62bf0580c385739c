"""Where the samples lie in the tensors of a batched run, and how to lay them out as vmap does.

With ``batch_dim``, fn can run under ``vmap`` over the samples (each call sees a batch of one) or,
where that is the same, on the whole batch at once: plain autograd, without vmap's cost on every
op, which is most of a small model's call. The batched run takes the one-sample shapes the probe
learned and finds, for every tap and every recorded input, the one dimension where the batch's
shape has ``B`` and the sample's has 1. The rules then see the same ``[B, *one]`` records and
``[K, B, *one]`` cotangents as after vmap (views, no copy). Where any shape does not fit (a tap
without samples, samples merged with another dimension), the run is made again under vmap.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

SHARED = -1  # a recorded input without samples (the same for every sample)


def sample_dim(shape: torch.Size, one: torch.Size, batch: int) -> int | None:
    """The dimension of ``shape`` that holds the samples, given the shape ``one`` of the same
    tensor on a batch of one: the only one that differs, 1 there and ``batch`` here. ``SHARED``
    when the shapes are equal; None when they do not fit (``batch`` is at least 2)."""
    if len(shape) != len(one):
        return None
    differ = [d for d, (size, single) in enumerate(zip(shape, one, strict=True)) if size != single]
    if not differ:
        return SHARED
    if len(differ) == 1 and one[differ[0]] == 1 and shape[differ[0]] == batch:
        return differ[0]
    return None


def as_stacked(x: Tensor, dim: int, lead: int, batch: int) -> Tensor:
    """``x`` with its samples at ``lead + dim`` -> the samples at ``lead``, then one sample's shape
    (its batch of one kept at ``lead + 1 + dim``), as vmap stacks them. ``dim`` may be SHARED."""
    if dim == SHARED:
        return x.unsqueeze(lead).expand(*x.shape[:lead], batch, *x.shape[lead:])
    if dim:
        x = x.movedim(lead + dim, lead)
    return x.unsqueeze(lead + 1 + dim)
