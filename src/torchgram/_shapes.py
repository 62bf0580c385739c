"""Layouts of Gramians: the generalized ``S + S[::-1]`` form and the flat ``[m, m]`` matrix."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def flatten(gramian: Tensor, /) -> Tensor:
    """The ``[m, m]`` matrix of a generalized Gramian ``S + S[::-1]``, with ``m = prod(S)``.

    Rows and columns follow the output's elements in row-major order, so ``flatten(G)`` is the
    Gramian of the Jacobian of ``out.reshape(-1)``. A 0-D Gramian gives ``[1, 1]``; an ``[m, m]``
    Gramian is returned as it is.

    Args:
        gramian: A generalized Gramian, e.g. ``[B, K, K, B]``.

    Returns:
        ``[m, m]``.

    Examples:
        >>> import torch, torchgram
        >>> G = torch.arange(16.0).reshape(2, 2, 2, 2)  # output [2, 2]
        >>> torchgram.flatten(G).shape
        torch.Size([4, 4])
        >>> bool(torchgram.flatten(G)[1, 2] == G[0, 1, 0, 1])
        True
    """
    if not isinstance(gramian, Tensor):
        raise TypeError(f"flatten(gramian): expected a tensor, got {type(gramian).__name__}.")
    n = gramian.dim() // 2
    shape = gramian.shape[:n]
    if gramian.dim() % 2 or tuple(gramian.shape[n:]) != tuple(reversed(shape)):
        raise ValueError(
            f"flatten(gramian): a generalized Gramian has shape S + S[::-1], got "
            f"{list(gramian.shape)}. Pass the Gramian of an output of shape S as returned by "
            "torchgram.gramian."
        )
    m = shape.numel()
    order = [*range(n), *reversed(range(n, 2 * n))]
    return gramian.permute(order).reshape(m, m)


def generalize(flat: Tensor, shape: torch.Size, batch_dim: int | None) -> Tensor:
    """Rows ``(k, i)`` of a ``[K*B, K*B]`` Gramian -> the generalized ``S + S[::-1]`` layout.

    Args:
        flat: ``[K*B, K*B]``, row ``k * B + i`` for sample ``i`` and per-sample element ``k``.
        shape: The output shape ``S`` (the batch of size B at ``batch_dim``; ``B = 1`` when None).
        batch_dim: Where the samples lie in ``S``, or None.
    """
    return generalize_cross(flat, shape, shape, batch_dim)


def generalize_cross(
    flat: Tensor, shape_a: torch.Size, shape_b: torch.Size, batch_dim: int | None
) -> Tensor:
    """Rows ``(k, i)`` of a ``[K*B_a, K*B_b]`` cross-Gramian -> the ``S_a + S_b[::-1]`` layout
    of two outputs with as many dimensions, the batch at ``batch_dim`` in both)."""
    n, m = len(shape_a), len(shape_b)
    if batch_dim is None:
        grid = flat.reshape((*shape_a, *shape_b))
        return grid.permute((*range(n), *reversed(range(n, n + m))))
    per_a = [size for d, size in enumerate(shape_a) if d != batch_dim]
    per_b = [size for d, size in enumerate(shape_b) if d != batch_dim]
    grid = flat.reshape((*per_a, shape_a[batch_dim], *per_b, shape_b[batch_dim]))
    first = [*range(batch_dim), n - 1, *range(batch_dim, n - 1)]
    second = [n + d for d in first]
    return grid.permute((*first, *reversed(second)))
