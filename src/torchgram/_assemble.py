"""Factors of all uses -> the ``[K*B, K*B]`` Gramian, leaf by leaf, with exact cross terms.

The gradient of one leaf is the sum of its uses' gradients, each on a region of the leaf (the
whole leaf, or a view such as one chunk of a packed projection). For each leaf:

1. factors on the same region are summed: linear factors by joining their tokens (the ghost form
   then holds all cross terms; an embedding joins as a linear map of one-hot tokens, e.g. with a
   tied output head, or, where the materialised form is the cheaper, its lookups are added into
   the head's per-sample gradients), others by materialising;
2. regions that never share an element contribute the sum of their own Gramians;
3. otherwise every region is materialised into the leaf and the Gramian is taken there.

A linear map's weight and bias, each a whole leaf used nowhere else, give one ghost Gramian for
both (the bias as a column of ones in the activations) instead of one each.

The direction (``weighted_gradients``) weights each leaf's factors, except where the Gramian
kept the leaf's per-sample gradients for it (``_reused``): those are weighted directly.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch

from torchgram._factors import (
    DEFAULT_CHUNK_BYTES,
    Dense,
    Factor,
    Kept,
    Linear,
    Reusable,
    dense_gramian,
    ghost_gramian,
    materialised_gramian,
    use_ghost,
)
from torchgram._internals import is_wrapped
from torchgram._ops.embedding import Embedding
from torchgram._uses import positions

Tensor = torch.Tensor


def gramian_of_factors(
    contributions: list[tuple[int, Factor]],
    leaves: Sequence[Tensor],
    rows: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    release: bool = False,
    keep: dict[int, list[Kept]] | None = None,
) -> Tensor:
    """Sum over leaves of the Gramian of each leaf's total per-row gradient.

    Args:
        contributions: ``(leaf position, factor)`` for every parameter argument of every use.
        leaves: The flattened parameter leaves.
        rows: ``K * B``.
        chunk_bytes: Largest intermediate a factor may build at once.
        release: Empty ``contributions`` and drop each leaf's factors once its Gramian is added
            (their tensors are freed then, unless held elsewhere).
        keep: Where to keep, by leaf, the per-sample gradients the Gramian builds anyway, for
            the direction (``weighted_gradients``) to reuse; see ``_reused``. None: keep none.

    Returns:
        ``[rows, rows]``.
    """
    by_leaf: dict[int, list[Factor]] = {}
    for leaf, factor in contributions:
        by_leaf.setdefault(leaf, []).append(factor)
    if release:
        contributions.clear()
    parts = [_shared_gramian(group, chunk_bytes) for group in _same_activations(by_leaf)]
    reused = set() if keep is None else _reused(by_leaf, leaves, rows, chunk_bytes)
    for leaf in list(by_leaf):
        if leaf not in by_leaf:  # a bias, added with its weight
            continue
        if leaf in reused and keep is not None:
            reusable = cast(Reusable, by_leaf.pop(leaf)[0])  # one factor (see _reused)
            parts.append(reusable.gramian_keeping(chunk_bytes, keep.setdefault(leaf, [])))
            continue
        parts.append(_group_gramian(by_leaf.pop(leaf), by_leaf, leaves[leaf].shape, chunk_bytes))
    if not parts:
        reference = leaves[0]
        return reference.new_zeros(rows, rows)
    return functools.reduce(operator.add, parts)


def weighted_gradients(
    contributions: Sequence[tuple[int, Factor]],
    leaves: Sequence[Tensor],
    weights: Tensor,
    kept: dict[int, list[Kept]] | None = None,
) -> list[Tensor]:
    """For each leaf, ``sum_r weights[r] g_r``: the vjp of the output with cotangent ``weights``.

    Args:
        contributions: ``(leaf position, factor)`` for every parameter argument of every use.
        leaves: The flattened parameter leaves.
        weights: ``[K, B]``.
        kept: Per-sample gradients a Gramian kept (``gramian_of_factors``), by leaf: those
            leaves are the weighted sums of their rows, and their factors are not read.

    Returns:
        One tensor shaped like each leaf (zeros for a leaf no use touched).
    """
    kept = kept or {}
    grads: list[Tensor | None] = [None] * len(leaves)
    for leaf, blocks in kept.items():
        part = _weighted_rows(blocks, weights.reshape(1, -1)).reshape(leaves[leaf].shape)
        grads[leaf] = part.to(torch.promote_types(part.dtype, leaves[leaf].dtype))
    for leaf, factor in contributions:
        if leaf in kept:
            continue
        part = factor.weighted(weights)
        shape = leaves[leaf].shape
        if factor.index is not None:
            index = factor.index.reshape(-1).to(part.device)
            part = part.new_zeros(shape.numel()).index_add(0, index, part.reshape(-1))
        part = part.reshape(shape).to(torch.promote_types(part.dtype, leaves[leaf].dtype))
        so_far = grads[leaf]
        grads[leaf] = part if so_far is None else so_far + part  # no zeros to add the first to
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves, strict=True)]


# Weighting kept gradients reads them once, memory-bound, where the direction's own product is
# compute-bound: keeping pays where that product sums over at least this many tokens per row
# (measured on CPU, JD step against SGD step, old and new interleaved in one process: the ViT's
# linear maps over 17 tokens went from 2.82x to 3.00x when kept, the LSTM's over 32 from 4.43x
# to 4.63x; the CNN's and MobileNetV3's convolutions over 64 to 1024 positions gained 13% and
# 5%).
_REUSE_GAIN = 64


def _reused(
    by_leaf: dict[int, list[Factor]], leaves: Sequence[Tensor], rows: int, budget: int
) -> set[int]:
    """The leaves whose per-sample gradients the Gramian builds and the direction reuses: one
    factor on the whole leaf, in a form that builds them, chosen by the work they save per
    byte (``reuse_gain``), most first, within ``budget`` bytes in all."""
    ranked = []
    for leaf, factors in by_leaf.items():
        factor = factors[0]
        if len(factors) != 1 or factor.index is not None:
            continue
        if not hasattr(factor, "reuse_gain"):  # not a Reusable (isinstance takes 6 us)
            continue
        reusable = cast(Reusable, factor)
        gain = reusable.reuse_gain()
        if gain >= _REUSE_GAIN:
            size = rows * leaves[leaf].numel() * reusable.gradient_element_size()
            ranked.append((-gain, leaf, size))
    chosen, room = set(), budget
    for _, leaf, size in sorted(ranked):  # the largest gain first, ties by position
        if size <= room:
            chosen.add(leaf)
            room -= size
    return chosen


def _weighted_rows(blocks: list[Kept], weights: Tensor) -> Tensor:
    """``weights [1, K*B]`` times kept gradient blocks, joined in the leaf's layout (in the
    promoted dtype: under autocast the blocks may be in a lower precision than the weights)."""
    parts = []
    for b in blocks:
        dtype = torch.promote_types(weights.dtype, b.g.dtype)
        parts.append(b.rows((weights.to(dtype) @ b.g.to(dtype)).view(-1)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _same_activations(by_leaf: dict[int, list[Factor]]) -> list[list[tuple[Linear, bool]]]:
    """Linear maps of the same activations (e.g. the heads of a multi-task model on one trunk),
    each the only factor of its whole leaf and with the ghost form the cheaper, taken out of
    ``by_leaf`` (with their bias leaves, ``True`` then) in groups of two or more that share
    their ghost similarities."""
    groups: dict[tuple[Any, ...], list[tuple[int, Linear, bool]]] = {}
    for leaf, factors in by_leaf.items():
        factor = factors[0]
        if len(factors) != 1 or not isinstance(factor, Linear) or factor.index is not None:
            continue
        if not use_ghost(factor.A.shape, factor.D.shape):
            continue
        bias = by_leaf.get(factor.bias, []) if factor.bias is not None else []
        with_bias = len(bias) == 1 and bias[0].index is None
        memory = _memory(factor.A)
        if memory is None:
            return []
        groups.setdefault((*memory, with_bias), []).append((leaf, factor, with_bias))
    shared = []
    for group in groups.values():
        if len(group) < 2:
            continue
        for leaf, factor, with_bias in group:
            del by_leaf[leaf]
            if with_bias:
                del by_leaf[factor.bias]  # type: ignore[arg-type]
        shared.append([(factor, with_bias) for _, factor, with_bias in group])
    return shared


def _memory(x: Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors the same values: the same memory, read the same way (None where
    it cannot be seen: under an outer vmap, whose tensors have no storage of their own, or with
    no memory at all)."""
    try:
        pointer = x.data_ptr()
    except RuntimeError:
        return None
    if not pointer:  # no memory to tell by (a fake or meta tensor, an empty one)
        return None
    return (pointer, x.shape, x.stride(), x.dtype, x.device)


def _shared_gramian(group: list[tuple[Linear, bool]], chunk_bytes: int) -> Tensor:
    """One ghost Gramian for linear maps of the same activations: their cotangents side by side
    (``<D, D>`` sums over the maps' outputs as over one map's)."""
    A = group[0][0].A
    D = torch.cat([factor.D for factor, _ in group], dim=-1)
    return ghost_gramian(A, D, chunk_bytes, ones=group[0][1])


def _group_gramian(
    factors: list[Factor], by_leaf: dict[int, list[Factor]], shape: torch.Size, chunk_bytes: int
) -> Tensor:
    """The Gramian of one leaf's factors, with its bias leaf's when they can go together."""
    G = _with_bias(factors, by_leaf, chunk_bytes)
    return _leaf_gramian(factors, shape, chunk_bytes) if G is None else G


def _with_bias(
    factors: list[Factor], by_leaf: dict[int, list[Factor]], chunk_bytes: int
) -> Tensor | None:
    """The Gramian of a weight leaf and its bias leaf together (the bias leaf is removed from
    ``by_leaf``), when each is one whole-leaf factor of one linear map and the ghost form applies;
    else None."""
    weight = factors[0]
    if len(factors) != 1 or not isinstance(weight, Linear) or weight.bias is None:
        return None
    bias = by_leaf.get(weight.bias, [])
    if weight.index is not None or len(bias) != 1 or bias[0].index is not None:
        return None
    G = weight.gramian_with_bias(chunk_bytes)
    if G is not None:
        del by_leaf[weight.bias]
    return G


def _leaf_gramian(factors: list[Factor], shape: torch.Size, chunk_bytes: int) -> Tensor:
    regions = group_by_region(factors, shape)
    if len(regions) == 1 and regions[0][0] is None:
        tied = _tied_gramian(regions[0][1], chunk_bytes)
        return region_sum(regions[0][1], shape).gramian(chunk_bytes) if tied is None else tied
    numel = shape.numel()
    indices = [positions(index, shape) for index, _ in regions]
    summed = [
        region_sum(group, index.shape) for (_, group), index in zip(regions, indices, strict=True)
    ]
    if _distinct(indices, numel):
        return torch.stack([factor.gramian(chunk_bytes) for factor in summed]).sum(0)
    flat = [
        scatter(factor.materialise(chunk_bytes), index, numel)
        for factor, index in zip(summed, indices, strict=False)
    ]
    return dense_gramian(sum(flat[1:], flat[0]))


def _tied_gramian(group: list[Factor], chunk_bytes: int) -> Tensor | None:
    """The Gramian of one linear map and embedding lookups of the same whole table (a tied
    output head) where the materialised form is the cheaper for them joined: the lookups are
    added into each block of the map's per-sample gradients, where joining them as one-hot
    tokens would spend as many products on the one-hot half as on the map (1.3 of HF GPT-2
    small's 2.6 GMAC per Gramian). None for any other group, or where the ghost form wins."""
    linear = [f for f in group if isinstance(f, Linear)]
    lookups = [f for f in group if isinstance(f, Embedding)]
    if len(linear) != 1 or not lookups or len(linear) + len(lookups) != len(group):
        return None
    (head,) = linear
    if head.D.shape[0] != 1 or any(e.D.shape[0] != 1 for e in lookups):  # joined only then
        return None
    if any(is_wrapped(e.tokens) for e in lookups):  # tokens under vmap: no host sync on them
        return None
    if not (is_wrapped(head.A) or is_wrapped(head.D)) and any(is_wrapped(e.D) for e in lookups):
        return None  # batched lookups cannot be added in place into unbatched blocks
    B, T, d_in = head.A.shape
    tokens = T + sum(e.tokens.shape[1] for e in lookups)
    if use_ghost(torch.Size((B, tokens, d_in)), torch.Size((1, B, tokens, head.D.shape[-1]))):
        return None
    return materialised_gramian(
        head.A, head.D, chunk_bytes, lookups=[(e.tokens, e.D) for e in lookups]
    )


def _distinct(indices: list[Tensor], numel: int) -> bool:
    """Whether the regions are disjoint and none repeats an element: marking every position in
    a mask of the leaf marks as many as there are positions (a twelfth of ``bincount``'s time
    on the 256 x 1024 leaf of a transposed weight, 0.26 against 3.2 ms)."""
    total = sum(index.numel() for index in indices)
    if total > numel:
        return False
    seen = torch.zeros(numel, dtype=torch.bool, device=indices[0].device)
    for index in indices:
        seen[index.reshape(-1)] = True
    return int(seen.sum()) == total


def same_region(a: Tensor | None, b: Tensor | None, shape: torch.Size) -> bool:
    if a is None and b is None:
        return True
    a, b = positions(a, shape), positions(b, shape)
    return a.shape == b.shape and torch.equal(a, b)


def group_by_region(
    factors: list[Factor], shape: torch.Size
) -> list[tuple[Tensor | None, list[Factor]]]:
    regions: list[tuple[Tensor | None, list[Factor]]] = []
    for factor in factors:
        for index, group in regions:
            if same_region(factor.index, index, shape):
                group.append(factor)
                break
            if factor.index is not None and factor.index.dim() == 2:
                if same_region(factor.index.T, index, shape):
                    group.append(factor.transposed(positions(index, shape)))
                    break
        else:
            regions.append((factor.index, [factor]))
    return regions


def region_sum(group: list[Factor], shape: torch.Size) -> Factor:
    """One factor whose gradients are the sum of the group's (all on one region of ``shape``)."""
    if len(group) == 1:
        return group[0]
    index = group[0].index
    linear = [_as_linear(factor) for factor in group]
    if all(factor is not None for factor in linear):
        A = torch.cat([factor.A for factor in linear if factor is not None], dim=1)
        D = torch.cat([factor.D for factor in linear if factor is not None], dim=2)
        return Linear(index, A, D)
    grads = [factor.materialise() for factor in group]
    rows = grads[0].shape[:2]
    return Dense(
        index, sum((g.reshape(*rows, *shape) for g in grads[1:]), grads[0].reshape(*rows, *shape))
    )


def _as_linear(factor: Factor) -> Linear | None:
    """The factor as a Linear one if it is one, or an embedding with one row per sample."""
    if isinstance(factor, Embedding) and factor.D.shape[0] == 1:
        return factor.as_linear()
    return factor if isinstance(factor, Linear) else None


def scatter(g: Tensor, index: Tensor, numel: int) -> Tensor:
    """Per-row gradients on a region ``[K, B, *region]`` -> on the whole leaf ``[K, B, numel]``."""
    K, B = g.shape[:2]
    flat = g.reshape(K * B, -1)
    out = flat.new_zeros(K * B, numel).index_add(1, index.reshape(-1).to(g.device), flat)
    return out.view(K, B, numel)
