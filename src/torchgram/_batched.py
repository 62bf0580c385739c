"""Where the samples lie in the tensors of a batched run, and how to lay them out as vmap does.

With ``batch_dim``, fn can run under ``vmap`` over the samples (each call sees a batch of one) or,
where that is the same, on the whole batch at once: plain autograd, without vmap's cost on every
op, which is most of a small model's call. The batched run takes the one-sample shapes the probe
learned and finds, for every tap and every recorded input, the one dimension where the batch's
shape has ``B`` times the sample's (1 there, or more where samples are merged with another
dimension). The rules then see the same ``[B, *one]`` records and
``[K, B, *one]`` cotangents as after vmap (views, no copy). Where any shape does not fit (a tap
without samples that the run could not give them, samples merged inside another dimension), the
run is made again under vmap.
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


def as_stacked(x: Tensor, dim: int, lead: int, batch: int) -> Tensor:
    """``x`` with its samples at ``lead + dim`` -> the samples at ``lead``, then one sample's shape
    (its batch of one kept at ``lead + 1 + dim``, or the rest of a merged dimension there), as
    vmap stacks them. ``dim`` may be SHARED."""
    if dim == SHARED:
        return x.unsqueeze(lead).expand(*x.shape[:lead], batch, *x.shape[lead:])
    x = x.unflatten(lead + dim, (batch, x.shape[lead + dim] // batch))
    return x.movedim(lead + dim, lead)
