"""Factors of two runs -> the ``[K_a*B_a, K_b*B_b]`` cross-Gramian ``J_a J_bᵀ``, leaf by leaf.

The cross-Gramian of one leaf is ``<g_a, g_b>`` between the total per-row gradients of the leaf
on the two batches. Per leaf and side, the factors of one region are summed as for a Gramian
(``torchgram._assemble``); then

- two linear maps (a joined embedding and tied head is one): the cross ghost form
  ``sum_ts <A_a[i,t], A_b[j,s]> <D_a[k,i,t], D_b[l,j,s]>`` or the materialised one, whichever the
  cost model finds cheaper;
- two embeddings: token equality between the batches, or the gradients on the tokens either
  batch holds, whichever is cheaper;
- two convolutions without groups: linear maps of their unfolded patches, as above;
- anything else (grouped convolutions, norms, the generic rule; uses on several regions of a
  leaf): the per-row gradients of each side, and their product.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch

from torchgram._assemble import group_by_region, region_sum, same_region, scatter
from torchgram._factors import (
    Factor,
    Linear,
    cross_ghost,
    rows_per_chunk,
)
from torchgram._ops.conv_factor import Conv
from torchgram._ops.embedding import Embedding
from torchgram._uses import positions

Tensor = torch.Tensor


def cross_of_factors(
    contributions_a: Sequence[tuple[int, Factor]],
    contributions_b: Sequence[tuple[int, Factor]],
    leaves: Sequence[Tensor],
    rows: tuple[int, int],
    chunk_bytes: int,
) -> Tensor:
    """Sum over leaves of ``<g_a, g_b>``, ``[rows_a, rows_b]``."""
    by_leaf_a = _by_leaf(contributions_a)
    by_leaf_b = _by_leaf(contributions_b)
    parts = [
        _leaf_cross(by_leaf_a[leaf], by_leaf_b[leaf], leaves[leaf].shape, chunk_bytes)
        for leaf in by_leaf_a
        if leaf in by_leaf_b
    ]
    if not parts:
        return leaves[0].new_zeros(rows)
    return functools.reduce(operator.add, parts)


def _by_leaf(contributions: Sequence[tuple[int, Factor]]) -> dict[int, list[Factor]]:
    by_leaf: dict[int, list[Factor]] = {}
    for leaf, factor in contributions:
        by_leaf.setdefault(leaf, []).append(factor)
    return by_leaf


def _leaf_cross(
    factors_a: list[Factor], factors_b: list[Factor], shape: torch.Size, chunk_bytes: int
) -> Tensor:
    regions_a = group_by_region(factors_a, shape)
    regions_b = group_by_region(factors_b, shape)
    if len(regions_a) == len(regions_b) == 1 and same_region(
        regions_a[0][0], regions_b[0][0], shape
    ):
        (index, group_a), (_, group_b) = regions_a[0], regions_b[0]
        region = shape if index is None else index.shape
        a, b = region_sum(group_a, region), region_sum(group_b, region)
        if isinstance(a, Linear) and isinstance(b, Linear):
            return linear_cross(a, b, chunk_bytes)
        if isinstance(a, Embedding) and isinstance(b, Embedding):
            return embedding_cross(a, b, chunk_bytes)
        if isinstance(a, Conv) and isinstance(b, Conv) and a.groups == b.groups == 1:
            return linear_cross(a.as_linear(), b.as_linear(), chunk_bytes)
        return _rows(a.materialise(chunk_bytes)) @ _rows(b.materialise(chunk_bytes)).T
    return _leaf_rows(regions_a, shape, chunk_bytes) @ _leaf_rows(regions_b, shape, chunk_bytes).T


def _rows(g: Tensor) -> Tensor:
    """``[K, B, ...]`` -> ``[K*B, n]``."""
    return g.reshape(g.shape[0] * g.shape[1], -1)


def _leaf_rows(
    regions: list[tuple[Tensor | None, list[Factor]]], shape: torch.Size, chunk_bytes: int
) -> Tensor:
    """The per-row gradients of a whole leaf, ``[K*B, numel]``, from its regions."""
    numel = shape.numel()
    total: Tensor | None = None
    for index, group in regions:
        where = positions(index, shape)
        g = scatter(region_sum(group, where.shape).materialise(chunk_bytes), where, numel)
        total = g if total is None else total + g
    assert total is not None
    return _rows(total)


def linear_cross(a: Linear, b: Linear, chunk_bytes: int) -> Tensor:
    """``<g_a, g_b>`` of two linear factors of one map, in the cheaper form."""
    (K_a, B_a, T_a, d_out), (K_b, B_b, T_b, _) = a.D.shape, b.D.shape
    d_in = a.A.shape[-1]
    ghost = B_a * B_b * T_a * T_b * (d_in + K_a * K_b * (d_out + 1))
    materialised = (K_a * B_a * T_a + K_b * B_b * T_b + K_a * B_a * K_b * B_b) * d_in * d_out
    if T_a == T_b == 1 or ghost <= materialised:
        A_a, A_b = a.A, b.A.to(a.A.dtype)

        def similarity(i: slice, j: slice) -> Tensor:
            return A_a[i].reshape(-1, d_in) @ A_b[j].reshape(-1, d_in).T

        return cross_ghost(similarity, a.D, b.D.to(a.D.dtype), chunk_bytes)
    per_row = (K_a * B_a + K_b * B_b) * d_in * a.A.element_size()
    step = rows_per_chunk(per_row, chunk_bytes, d_out)
    parts = []
    for start in range(0, d_out, step):
        out = slice(start, start + step)
        parts.append(_sample_major(a.D[..., out], a.A) @ _sample_major(b.D[..., out], b.A).T)
    # rows (i, k) -> (k, i): a permutation of the small product, not of the gradients
    G = functools.reduce(operator.add, parts).view(B_a, K_a, B_b, K_b)
    return G.permute(1, 0, 3, 2).reshape(K_a * B_a, K_b * B_b)


def _sample_major(D: Tensor, A: Tensor) -> Tensor:
    """Per-sample gradients ``D[k, i]ᵀ A[i]`` as ``[B*K, e*d]``, rows ``(i, k)``: one ``bmm``
    whose output needs no copy to be read as rows (``per_sample_products``' ``[K, B, ...]``
    layout would)."""
    K, B, T, e = D.shape
    left = D.permute(1, 0, 3, 2).reshape(B, K * e, T)
    return torch.bmm(left, A).view(B * K, -1)


def embedding_cross(a: Embedding, b: Embedding, chunk_bytes: int) -> Tensor:
    """``<g_a, g_b>`` of two embedding factors of one table: token equality between the batches
    (ghost), or the gradients on the distinct tokens of both batches, whichever is cheaper."""
    (K_a, B_a, T_a, d), (K_b, B_b, T_b, _) = a.D.shape, b.D.shape
    distinct, inverse = torch.unique(
        torch.cat([a.tokens.reshape(-1), b.tokens.reshape(-1)]), return_inverse=True
    )
    U = distinct.numel()
    ghost = B_a * B_b * T_a * T_b * (1 + K_a * K_b * (d + 1))
    compact = (K_a * B_a * T_a + K_b * B_b * T_b) * d + K_a * B_a * K_b * B_b * U * d
    if ghost <= compact:
        tokens_a, tokens_b = a.tokens, b.tokens

        def similarity(i: slice, j: slice) -> Tensor:
            same = tokens_a[i].reshape(-1, 1) == tokens_b[j].reshape(1, -1)
            return same.to(a.D.dtype)

        return cross_ghost(similarity, a.D, b.D, chunk_bytes)
    slots_a, slots_b = inverse[: a.tokens.numel()], inverse[a.tokens.numel() :]
    return _rows(_on_tokens(a.D, slots_a, U)) @ _rows(_on_tokens(b.D, slots_b, U)).T


def _on_tokens(D: Tensor, slots: Tensor, U: int) -> Tensor:
    """Per-sample gradients on U tokens, ``[K, B, U, d]``, from cotangents ``[K, B, T, d]`` and
    each token's slot among the U."""
    K, B, T, d = D.shape
    where = (slots.view(B, T) + U * torch.arange(B, device=slots.device).unsqueeze(1)).reshape(-1)
    g = D.new_zeros(K, B * U, d).index_add_(1, where, D.reshape(K, B * T, d))
    return g.view(K, B, U, d)
