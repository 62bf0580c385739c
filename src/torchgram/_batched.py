"""Where the samples lie in the tensors of a batched run, and how to lay them out as vmap does.

With ``batch_dim``, fn can run under ``vmap`` over the samples (each call sees a batch of one) or,
where that is the same, on the whole batch at once: plain autograd, without vmap's cost on every
op, which is most of a small model's call. The batched run takes the one-sample shapes the probe
learned and finds, for every tap and every recorded input, the one dimension where the batch's
shape has ``B`` times the sample's (1 there, or more where samples are merged with another
dimension). The rules then see the same ``[B, *one]`` records and
``[K, B, *one]`` cotangents as after vmap (views, no copy). Merged samples may be the merged
dimension's outer factor (``x.view(-1, d)`` of ``[B, T, d]``) or its inner one (``[T * B, d]``);
the first call tells which from the vmapped run's records. Where any shape does not fit (a tap
without samples that the run could not give them), the run is made again under vmap.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

SHARED = -1  # a recorded input without samples (the same for every sample)


def sample_dim(shape: torch.Size, one: torch.Size, batch: int) -> int | None:
    """The dimension of ``shape`` that holds the samples, given the shape ``one`` of the same
    tensor on a batch of one: the only one that differs, ``batch`` times larger here (1 there:
    the batch's own dimension; or more: the samples merged with another dimension as its outer
    factor, ``x.view(-1, d)`` of ``[B, T, d]``). ``SHARED`` when the shapes are equal; None when
    they do not fit (``batch`` is at least 2). Whether merged samples are the outer factor is
    not known from the shapes: the first call checks the run's Gramian against the per-sample
    run's."""
    if len(shape) != len(one):
        return None
    differ = [d for d, (size, single) in enumerate(zip(shape, one, strict=True)) if size != single]
    if not differ:
        return SHARED
    if len(differ) == 1 and shape[differ[0]] == batch * one[differ[0]]:
        return differ[0]
    return None


def as_stacked(x: Tensor, dim: int, lead: int, batch: int, inner: bool = False) -> Tensor:
    """``x`` with its samples at ``lead + dim`` -> the samples at ``lead``, then one sample's shape
    (its batch of one kept at ``lead + 1 + dim``, or the rest of a merged dimension there), as
    vmap stacks them. ``dim`` may be SHARED. ``inner``: the samples are the inner factor of a
    merged dimension (``[T * B, d]`` of ``[T, B, d]``, as ``nn.MultiheadAttention`` gives its
    output projection), not the outer one."""
    if dim == SHARED:
        return x.unsqueeze(lead).expand(*x.shape[:lead], batch, *x.shape[lead:])
    rest = x.shape[lead + dim] // batch
    if inner:
        return x.unflatten(lead + dim, (rest, batch)).movedim(lead + dim + 1, lead)
    return x.unflatten(lead + dim, (batch, rest)).movedim(lead + dim, lead)


def merged(x: Tensor, dim: int, batch: int) -> bool:
    """Whether the samples of ``x`` (at ``dim``, see ``sample_dim``) are merged with another
    dimension, so that they may be its outer or its inner factor."""
    return dim != SHARED and x.shape[dim] != batch
