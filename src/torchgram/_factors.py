"""Per-sample gradients of one parameter region, in the forms a Gramian can be built from.

Rows are indexed ``(k, i)``: ``k`` over the K non-batch output elements, ``i`` over the B samples,
flattened as ``k * B + i``. Every factor describes the gradients ``g[k, i]`` of the output row
``(k, i)`` with respect to a region of one parameter leaf.

- ``Linear``: ``g[k, i] = sum_t D[k, i, t]ᵀ A[i, t]`` (a linear map used on T tokens). Its
  Gramian has a ghost form that never builds ``g`` and a materialised form; the cheaper one is used.
- ``Dense``: ``g`` itself, ``[K, B, *region]``.
- ``torchgram._ops.conv_factor.Conv`` and ``torchgram._ops.embedding.Embedding``: the
  same idea for convolutions (unfolded patches, per group) and embeddings (token equality).

Every ``gramian`` takes ``chunk_bytes``: the largest intermediate it may build at once (blocks of
the ``[B, T, B, T]`` ghost products, per-sample gradients); work is split into chunks beyond it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

Tensor = torch.Tensor

DEFAULT_CHUNK_BYTES = 24 * 2**20


class Factor(Protocol):
    """What the assembly needs from a factor (see the module docstring)."""

    @property
    def index(self) -> Tensor | None: ...

    def transposed(self, index: Tensor) -> Factor: ...

    def materialise(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor: ...

    def weighted(self, weights: Tensor) -> Tensor: ...

    def gramian(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor: ...


@runtime_checkable
class Reusable(Protocol):
    """A factor whose Gramian may build per-sample gradients the direction can reuse."""

    def reuse_gain(self) -> float: ...

    def gradient_element_size(self) -> int: ...

    def gramian_keeping(self, chunk_bytes: int, keep: list[Kept] | None) -> Tensor: ...


@dataclass(frozen=True)
class Kept:
    """A block of per-row gradients that a Gramian built, kept for the direction to reuse.

    Attributes:
        g: ``[K*B, n]``, rows ``k * B + i``.
        rows: Turns a weighted sum ``[n]`` of the rows of ``g`` into the leaf's layout: the
            block's ``[c, ...]`` consecutive entries along the leaf's first dimension.
    """

    g: Tensor
    rows: Callable[[Tensor], Tensor]


def common(factor: Any, first: str, second: str) -> None:
    """Cast two tensors of a frozen factor to their promoted dtype. Under autocast inside fn a
    map's input and its output's cotangent differ (float32 and bfloat16), and the rules run
    after fn, outside autocast, where products of mixed dtypes fail."""
    a, b = getattr(factor, first), getattr(factor, second)
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        object.__setattr__(factor, first, a.to(dtype))
        object.__setattr__(factor, second, b.to(dtype))


@dataclass(frozen=True)
class Linear:
    """``g[k, i] = sum_t D[k, i, t]ᵀ A[i, t]``, a ``[d_out, d_in]`` gradient.

    Attributes:
        index: Flat leaf positions of the ``[d_out, d_in]`` region, or None for the whole leaf.
        A: Activations ``[B, T, d_in]``.
        D: Output cotangents ``[K, B, T, d_out]``.
        bias: Position of the leaf of the map's bias (whole, ``[d_out]``), whose gradients are
            ``sum_t D[k, i, t]``, or None: the assembly may then add both leaves' Gramians at
            once (see ``gramian_with_bias``).
    """

    index: Tensor | None
    A: Tensor
    D: Tensor
    bias: int | None = None

    def __post_init__(self) -> None:
        common(self, "A", "D")

    def transposed(self, index: Tensor) -> Factor:
        """The same gradients seen as ``[d_in, d_out]``, on the region ``index`` of that shape.

        With one output row per sample the roles of activations and cotangents swap; otherwise the
        gradients are materialised.
        """
        if self.D.shape[0] == 1:
            return Linear(index, self.D[0], self.A.unsqueeze(0))
        return Dense(index, self.materialise().transpose(-1, -2))

    def materialise(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """The per-sample gradients ``[K, B, d_out, d_in]``."""
        return torch.einsum("kbte,btd->kbed", self.D, self.A)

    def weighted(self, weights: Tensor) -> Tensor:
        """``sum_ki weights[k, i] g[k, i]``, ``[d_out, d_in]``, without forming ``g``."""
        D = torch.einsum("kb,kbte->bte", weights, self.D)
        return D.reshape(-1, D.shape[-1]).T @ self.A.reshape(-1, self.A.shape[-1])

    def gramian(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """``[K*B, K*B]`` Gramian of the gradients, in the cheaper of the two forms."""
        if use_ghost(self.A.shape, self.D.shape):
            return ghost_gramian(self.A, self.D, chunk_bytes)
        return materialised_gramian(self.A, self.D, chunk_bytes)

    def reuse_gain(self) -> float:
        """How many times less work weighting kept per-sample gradients takes than ``weighted``
        (``T / K``: its product sums over the T tokens), where the Gramian builds them (the
        materialised form); else 0."""
        K, _, T = self.D.shape[:3]
        return 0.0 if use_ghost(self.A.shape, self.D.shape) else T / K

    def gradient_element_size(self) -> int:
        """Bytes per element of the per-sample gradients it builds (the promoted dtype of
        ``A`` and ``D``, which may differ from the leaf's under autocast)."""
        return self.A.element_size()

    def gramian_keeping(self, chunk_bytes: int, keep: list[Kept] | None) -> Tensor:
        """The materialised Gramian, its per-sample gradient blocks appended to ``keep``."""
        return materialised_gramian(self.A, self.D, chunk_bytes, keep=keep)

    def gramian_with_bias(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor | None:
        """The Gramian of the weight's and the bias's gradients together (the bias as a column
        of ones in ``A``: ``<A[i,t], A[j,s]> + 1`` in the ghost form, so the bias costs nothing),
        or None when the materialised form is the cheaper one (then the bias's own Gramian is
        cheaper than widening every per-sample gradient)."""
        if not use_ghost(self.A.shape, self.D.shape):
            return None
        return ghost_gramian(self.A, self.D, chunk_bytes, ones=True)


@dataclass(frozen=True)
class Dense:
    """Materialised per-sample gradients ``g`` ``[K, B, *region]`` of a leaf region."""

    index: Tensor | None
    g: Tensor

    def transposed(self, index: Tensor) -> Dense:
        return Dense(index, self.g.transpose(-1, -2))

    def materialise(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        return self.g

    def weighted(self, weights: Tensor) -> Tensor:
        dtype = torch.promote_types(weights.dtype, self.g.dtype)  # autocast: g may be lower
        return torch.tensordot(weights.to(dtype), self.g.to(dtype), dims=2)

    def gramian(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        return dense_gramian(self.g)


@dataclass(frozen=True)
class TokenSum:
    """A bias's per-sample gradients ``sum_t D[k, i, t]`` ``[K, B, d_out]``, summed when first
    needed: a bias that joins its weight's ghost Gramian (see ``Linear.bias``) needs none."""

    index: Tensor | None
    D: Tensor

    @functools.cached_property
    def dense(self) -> Dense:
        return Dense(self.index, self.D.sum(dim=2))

    def transposed(self, index: Tensor) -> Dense:
        return self.dense.transposed(index)

    def materialise(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        return self.dense.g

    def weighted(self, weights: Tensor) -> Tensor:
        return self.dense.weighted(weights)

    def gramian(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        return self.dense.gramian(chunk_bytes)


def ghost_cost(a_shape: torch.Size, d_shape: torch.Size) -> int:
    """Multiply-adds of ``ghost_gramian`` for activations ``[B, T, d_in]``."""
    K, B, T, d_out = d_shape[:4]
    d_in = a_shape[-1]
    return B * B * T * T * d_in + cotangent_cost(K, B, T, d_out)


def cotangent_cost(K: int, B: int, T: int, d: int) -> int:
    """Multiply-adds of the cotangent side of ``ghost_from_similarity``, given the
    similarities: ``<D, D>`` products weighted by them, or, for one sample, ``S @ D`` first."""
    pairs = _pairs_cost(K, B, T, d)
    return min(pairs, _through_similarity_cost(K, T, d)) if B == 1 else pairs


def _pairs_cost(K: int, B: int, T: int, d: int) -> int:
    return B * B * T * T * K * K * (d + 1)


def _through_similarity_cost(K: int, T: int, d: int) -> int:
    return K * T * T * d + K * K * T * d


def materialised_cost(a_shape: torch.Size, d_shape: torch.Size) -> int:
    """Multiply-adds of building per-sample gradients, then their Gramian."""
    K, B, T, d_out = d_shape[:4]
    d_in = a_shape[-1]
    return K * B * T * d_in * d_out + (K * B) ** 2 * d_in * d_out


# Measured on CPU (2 threads, ``python benchmarks/bench_linear.py``): the ghost form's products
# run at a median 130 GMAC/s, the materialised form's (per-sample products that sum over the
# tokens, then their Gramian) at 76. A linear map's materialised multiply-adds count this many
# times a ghost one: of the weights 1.0 to 2.0 it loses the least time over the script's 72
# shapes (the slower form on 2 of them, 0.05 ms in all, against 8 and 6.8 ms counting them
# alike, where the ViT's maps over 17 tokens took the slower form).
MATERIALISED_WEIGHT = 1.6


def use_ghost(
    a_shape: torch.Size, d_shape: torch.Size, materialised_weight: float = MATERIALISED_WEIGHT
) -> bool:
    """Whether the ghost form is the cheaper one for a linear map (T = 1 always is: no
    per-sample gradient), its materialised multiply-adds weighted by their slower rate
    (a convolution's kernels were measured against the plain counts: weight 1)."""
    if d_shape[2] == 1:
        return True
    return ghost_cost(a_shape, d_shape) <= materialised_weight * materialised_cost(a_shape, d_shape)


def rows_per_chunk(bytes_per_row: int, chunk_bytes: int, rows: int) -> int:
    return max(1, min(rows, chunk_bytes // max(bytes_per_row, 1)))


def ghost_gramian(
    A: Tensor, D: Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES, ones: bool = False
) -> Tensor:
    """``G[(k,i),(l,j)] = sum_ts <A[i,t], A[j,s]> <D[k,i,t], D[l,j,s]>`` without per-sample grads.

    Args:
        A: ``[B, T, d_in]``.
        D: ``[K, B, T, d_out]``.
        chunk_bytes: Largest block of ``[K, b, T, K, b, T]`` products built at once.
        ones: Whether ``A`` has one more column of ones (a bias): ``+ 1`` on every similarity.

    Returns:
        ``[K*B, K*B]``.
    """
    K, B, T, _ = D.shape
    if T == 1:
        a = A[:, 0]
        d = D[:, :, 0].reshape(K * B, -1)
        aa = a @ a.T + 1 if ones else a @ a.T
        return ((d @ d.T).view(K, B, K, B) * aa[:, None]).view(K * B, K * B)

    def similarity(i: slice, j: slice) -> Tensor:
        S = A[i].reshape(-1, A.shape[-1]) @ A[j].reshape(-1, A.shape[-1]).T
        return S + 1 if ones else S

    return ghost_from_similarity(similarity, D, chunk_bytes, block_products=_BLOCK_PRODUCTS)


# Blocks of a linear map's ghost Gramian of about this many products ``[K, b, T, K, b, T]``
# (256 KiB in float32), of even sizes, run faster on CPU than one block for the whole batch,
# whatever ``chunk_bytes`` allows: the products stay in cache, and the mirrored blocks are not
# computed. One block took a median 1.21x the time over ``benchmarks/bench_linear.py``'s 72
# shapes (quartiles 1.08x-1.31x); only 64 -> 64 maps, which take the materialised form, ran
# faster in one.
_BLOCK_PRODUCTS = 2**16


def ghost_from_similarity(
    similarity: Callable[[slice, slice], Tensor],
    D: Tensor,
    chunk_bytes: int,
    similarity_elements: int = 0,
    block_products: int | None = None,
) -> Tensor:
    """``G[(k,i),(l,j)] = sum_ts S[i,t,j,s] <D[k,i,t], D[l,j,s]>``, by blocks of samples.

    Args:
        similarity: ``(samples i, samples j) -> S [b_i*T, b_j*T]`` for two slices of samples
            (``<A[i,t], A[j,s]>`` for a linear map, token equality for an embedding).
        D: ``[K, B, T, d_out]``.
        chunk_bytes: Largest block of ``[K, b, T, K, b, T]`` products built at once, with
            what ``similarity`` builds for it.
        similarity_elements: How many elements ``similarity`` builds per pair of samples
            beyond ``S`` itself (the pixel form of a convolution: its pixel products).
        block_products: At most this many products per block (at least one pair of samples),
            or None: as many as ``chunk_bytes`` allows.

    Returns:
        ``[K*B, K*B]``.
    """
    K, B, T, d = D.shape
    whole = slice(0, B)
    if B == 1 and _through_similarity_cost(K, T, d) < _pairs_cost(K, B, T, d):
        # one sample (batch_dim=None): G = <D_k, S D_l>, K times fewer products than <D, D>
        S = similarity(whole, whole)
        dtype = torch.promote_types(S.dtype, D.dtype)  # under autocast they may differ
        SD = torch.matmul(S.to(dtype), D[:, 0].to(dtype))  # [K, T, d]
        return D.reshape(K, -1).to(dtype) @ SD.reshape(K, -1).T
    per_pair = (2 * K * K * T * T + similarity_elements) * D.element_size()
    block = max(1, min(B, math.isqrt(max(chunk_bytes // per_pair, 1))))
    if block_products is not None:
        block = max(1, min(block, math.isqrt(block_products // (K * K * T * T))))
        block = -(-B // -(-B // block))  # as many blocks, of even sizes (not 15 and 1)
    if block >= B:
        return _ghost_block(similarity(whole, whole), D, D).reshape(K * B, K * B)
    starts = range(0, B, block)
    blocks: dict[tuple[int, int], Tensor] = {}
    for i in starts:
        for j in starts:
            if j < i:  # the Gramian is symmetric: the mirrored block comes for free
                blocks[i, j] = blocks[j, i].permute(2, 3, 0, 1)
                continue
            rows, cols = slice(i, i + block), slice(j, j + block)
            blocks[i, j] = _ghost_block(similarity(rows, cols), D[:, rows], D[:, cols])
    # joined out of place (no writes into a buffer), so that an outer vmap can batch it
    G = torch.cat([torch.cat([blocks[i, j] for j in starts], dim=3) for i in starts], dim=1)
    return G.reshape(K * B, K * B)


def _ghost_block(similarity: Tensor, D_i: Tensor, D_j: Tensor) -> Tensor:
    """``[K_i, b_i, K_j, b_j]`` block of a ghost Gramian (of a cross-Gramian where the two sides
    differ in rows or tokens)."""
    K_i, b_i, T_i, _ = D_i.shape
    K_j, b_j, T_j, _ = D_j.shape
    dd = D_i.reshape(K_i * b_i * T_i, -1) @ D_j.reshape(K_j * b_j * T_j, -1).T
    products = dd.view(K_i, b_i, T_i, K_j, b_j, T_j) * similarity.view(1, b_i, T_i, 1, b_j, T_j)
    return products.sum(dim=(2, 5))


def cross_ghost(
    similarity: Callable[[slice, slice], Tensor], D_a: Tensor, D_b: Tensor, chunk_bytes: int
) -> Tensor:
    """``G[(k,i),(l,j)] = sum_ts S[i,t,j,s] <D_a[k,i,t], D_b[l,j,s]>`` between two batches.

    Args:
        similarity: ``(samples i of a, samples j of b) -> S [b_i*T_a, b_j*T_b]``.
        D_a: ``[K_a, B_a, T_a, d]``.
        D_b: ``[K_b, B_b, T_b, d]``.
        chunk_bytes: Largest block of products built at once.

    Returns:
        ``[K_a*B_a, K_b*B_b]``.
    """
    K_a, B_a, T_a, d = D_a.shape
    K_b, B_b, T_b, _ = D_b.shape
    if B_a == B_b == 1 and K_b * T_a * T_b * d + K_a * K_b * T_a * d < K_a * K_b * T_a * T_b * d:
        S = similarity(slice(0, 1), slice(0, 1))  # one sample each: <D_a_k, S D_b_l>
        dtype = torch.promote_types(S.dtype, D_b.dtype)
        SD = torch.matmul(S.to(dtype), D_b[:, 0].to(dtype))  # [K_b, T_a, d]
        return D_a.reshape(K_a, -1).to(dtype) @ SD.reshape(K_b, -1).T
    per_pair = (2 * K_a * K_b * T_a * T_b) * D_a.element_size()
    block = max(1, math.isqrt(max(chunk_bytes // max(per_pair, 1), 1)))
    rows = []
    for i in range(0, B_a, block):
        si = slice(i, i + block)
        row = [
            _ghost_block(similarity(si, slice(j, j + block)), D_a[:, si], D_b[:, j : j + block])
            for j in range(0, B_b, block)
        ]
        rows.append(torch.cat(row, dim=3))
    return torch.cat(rows, dim=1).reshape(K_a * B_a, K_b * B_b)


def materialised_gramian(
    A: Tensor,
    D: Tensor,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    lookups: Sequence[tuple[Tensor, Tensor]] = (),
    keep: list[Kept] | None = None,
) -> Tensor:
    """The Gramian of per-sample gradients ``D[k, i]ᵀ A[i]``, built a block of rows of g at a time.

    The gradients are split along ``d_out``: each block ``[K, B, e, d_in]`` of them adds its own
    Gramian, so no more than ``chunk_bytes`` of gradients exist at once and no work is repeated.
    ``lookups``: ``(tokens [B, T'], cotangents [K, B, T', d_in])`` of lookups of rows of the same
    ``[d_out, d_in]`` table (an embedding tied to this map), each adding its cotangent to row
    ``tokens[i, t]`` of g[k, i]. ``keep``: where to append the blocks, for the direction.
    """
    K, B, _, d_out = D.shape
    per_row = K * B * A.shape[-1] * A.element_size()
    step = rows_per_chunk(per_row, chunk_bytes, d_out)
    added = [_sorted_lookups(tokens, E, d_out, step) for tokens, E in lookups]
    G: Tensor | None = None
    for block, start in enumerate(range(0, d_out, step)):
        g = per_sample_products(D[..., start : start + step], A)  # [K, B, e, d_in]
        for rows, order, E, ends in added:
            if ends[block] == ends[block + 1]:
                continue  # no lookup of this block's rows
            found = slice(ends[block], ends[block + 1])
            sample = order[found, None] // (E.shape[1] // B)
            # g is a view of a [B, K, e, d_in] product: add there, at rows (i, k, r)
            flat = g.transpose(0, 1).view(-1, g.shape[-1])
            at = (sample * K + torch.arange(K, device=g.device)) * g.shape[2]
            at = at + (rows[found, None] - start)
            values = E[:, order[found]].transpose(0, 1)  # [n, K, d_in]
            flat.index_add_(0, at.reshape(-1), values.reshape(-1, g.shape[-1]).to(g.dtype))
        if keep is not None:
            flat = g.reshape(K * B, -1)
            keep.append(Kept(flat, functools.partial(_unflatten, columns=g.shape[-1])))
            g = flat.view(K, B, -1)
        part = dense_gramian(g)
        G = part if G is None else G + part
    assert G is not None
    return G


def _unflatten(v: Tensor, columns: int) -> Tensor:
    return v.view(-1, columns)


def _sorted_lookups(
    tokens: Tensor, E: Tensor, d_out: int, step: int
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """A table's lookups sorted by row: the rows, where each lookup is among the ``B * T``,
    the cotangents ``[K, B * T, d]`` (a view), and where each block of ``step`` rows begins
    among the sorted lookups (one host synchronisation)."""
    K, B, T = E.shape[:3]
    rows, order = torch.sort(tokens.reshape(-1))
    bounds = torch.arange(0, d_out + step, step, device=rows.device).clamp(max=d_out)
    ends = torch.searchsorted(rows, bounds).tolist()
    return rows, order, E.reshape(K, B * T, E.shape[-1]), ends


def per_sample_products(D: Tensor, A: Tensor) -> Tensor:
    """``einsum("kbte,btd->kbed", D, A)`` as one ``bmm`` over the samples (the K rows side by
    side): the same products without einsum's parsing, which costs more than them for a
    multi-task head (``[2, 1, 64, 1]`` cotangents: 46 against 72 us with the Gramian). For one
    token (outer products, as ``Linear.materialise`` may build) einsum is the faster."""
    K, B, T, e = D.shape
    left = D.permute(1, 0, 3, 2).reshape(B, K * e, T)
    return torch.bmm(left, A).view(B, K, e, A.shape[-1]).transpose(0, 1)


# Few long rows: one product per slice of the columns, batched, then summed, runs 5-25% faster
# than one ``flat @ flat.T`` on CPU (measured for 16-128 rows of 2^15-2^20 columns; slower for
# fewer than about four slices).
_SLICE_ROWS, _SLICE = 128, 2**13


def dense_gramian(g: Tensor) -> Tensor:
    """``[K*B, K*B]`` Gramian of materialised gradients ``[K, B, ...]``."""
    flat = g.reshape(g.shape[0] * g.shape[1], -1)
    rows, columns = flat.shape
    slices = columns // _SLICE
    if rows > _SLICE_ROWS or slices < 4:
        return flat @ flat.T
    body = flat[:, : slices * _SLICE].reshape(rows, slices, _SLICE).transpose(0, 1)
    G = torch.bmm(body, body.transpose(1, 2)).sum(0)
    if slices * _SLICE < columns:
        rest = flat[:, slices * _SLICE :]
        G = G + rest @ rest.T
    return G
