"""``embedding``: its rule and its factor, a linear map from one-hot tokens that never builds the
one-hot vectors.

Sample i looks up the rows ``tokens[i, t]`` of a ``[V, d]`` table, so its gradient adds the output
cotangent ``D[k, i, t]`` into row ``tokens[i, t]`` (cotangents at the padding index are zeroed:
that row gets no gradient). Two forms of the Gramian:

- ghost: ``G[(k,i),(l,j)] = sum_ts [tokens[i,t] == tokens[j,s]] <D[k,i,t], D[l,j,s]>``;
- compact: the per-sample gradients on the U distinct tokens of the batch only, ``[K, B, U, d]``,
  built a block of tokens at a time within ``max_chunk_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchgram._factors import (
    DEFAULT_CHUNK_BYTES,
    Dense,
    Factor,
    Linear,
    cotangent_cost,
    dense_gramian,
    ghost_from_similarity,
    rows_per_chunk,
)
from torchgram._internals import is_wrapped
from torchgram._ops.common import Contribution, Rule
from torchgram._ops.norm import CrossSampleOpError
from torchgram._uses import DataRef, ParamView, Use

Tensor = torch.Tensor


def embedding_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``torch.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)``.

    ``F.embedding(indices, weight, ...)`` is stepped into by the tape and records this builtin,
    whose first argument is the table. Rows at ``padding_idx`` get no gradient; with
    ``scale_grad_by_freq`` (only without samples, see ``check_embedding``) the generic rule
    takes over.
    """
    args, kwargs = use.arguments()
    if kwargs or len(args) < 2:
        return None
    weight, indices = args[0], args[1]
    padding_idx = args[2] if len(args) > 2 else -1
    scale_grad_by_freq = bool(args[3]) if len(args) > 3 else False
    if not (isinstance(weight, ParamView) and isinstance(indices, DataRef)) or scale_grad_by_freq:
        return None
    if weight.tensor.dim() != 2:
        return None
    (cotangent,) = cotangents
    K, B = cotangent.shape[:2]
    rows, width = weight.tensor.shape
    tokens = records[indices.record].reshape(B, -1)
    D = cotangent.reshape(K, B, -1, width)
    if padding_idx is not None and padding_idx >= 0:
        D = D * (tokens != padding_idx).unsqueeze(-1).to(D.dtype)
    return [(weight.leaf, Embedding(weight.index, tokens, D, rows))]


def check_embedding(args: Sequence[Any], kwargs: dict, caller: str, per_sample: bool) -> None:
    """Refuse ``scale_grad_by_freq`` with samples: it divides a row's gradient by the row's
    count in the whole batch, so a sample's gradient depends on the other samples (per sample,
    the tokens would be counted in that sample alone). With ``batch_dim=None`` every row sees
    the batch's counts, as autograd does: exact."""
    if kwargs:  # F.embedding(input, weight, ..., scale_grad_by_freq=...)
        scaled = kwargs.get("scale_grad_by_freq", False)
    else:  # torch.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)
        scaled = args[3] if len(args) > 3 else False
    if per_sample and scaled:
        raise CrossSampleOpError(
            f"{caller}: fn calls embedding with scale_grad_by_freq=True, which divides each "
            "row's gradient by that row's count in the whole batch, so a sample's gradient "
            "depends on the other samples and batch_dim's promise does not hold. Pass "
            "scale_grad_by_freq=False, or batch_dim=None (exact, with the batch's counts)."
        )


@dataclass(frozen=True)
class Embedding:
    """Per-sample gradients of an embedding table.

    Attributes:
        index: Flat leaf positions of the ``[V, d]`` region, or None for the whole leaf.
        tokens: ``[B, T]`` integer tokens.
        D: Output cotangents ``[K, B, T, d]``, zero where the token is the padding index.
        rows: V, the number of rows of the table.
    """

    index: Tensor | None
    tokens: Tensor
    D: Tensor
    rows: int

    def _compact_blocks(self, chunk_bytes: int) -> Iterator[Tensor]:
        """Per-sample gradients on the distinct tokens of the batch, ``[K, B, u, d]`` for
        consecutive blocks of u of them, each within ``chunk_bytes``: the lookups sorted by
        token once, each block adds its own range of them (one block needs no sorting)."""
        K, B, T, d = self.D.shape
        distinct, inverse = torch.unique(self.tokens, return_inverse=True)
        U = distinct.numel()
        step = rows_per_chunk(K * B * d * self.D.element_size(), chunk_bytes, U)
        D = self.D.reshape(K, B * T, d)
        if step >= U:  # one block: no sorting
            slots = (inverse + U * torch.arange(B, device=inverse.device).unsqueeze(1)).reshape(-1)
            yield D.new_zeros(K, B * U, d).index_add_(1, slots, D).view(K, B, U, d)
            return
        order = torch.argsort(inverse.reshape(-1))
        token, sample = inverse.reshape(-1)[order], order // T
        ends = [0, *torch.bincount(token, minlength=U).cumsum(0).tolist()]
        for start in range(0, U, step):
            stop = min(U, start + step)
            lookups = slice(ends[start], ends[stop])
            slots = token[lookups] - start + (stop - start) * sample[lookups]
            g = D.new_zeros(K, B * (stop - start), d).index_add_(1, slots, D[:, order[lookups]])
            yield g.view(K, B, stop - start, d)

    def materialise(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """Per-sample gradients ``[K, B, V, d]``."""
        K, B, T, d = self.D.shape
        slots = (
            self.tokens + self.rows * torch.arange(B, device=self.tokens.device)[:, None]
        ).reshape(-1)
        g = self.D.new_zeros(K, B * self.rows, d)
        return g.index_add_(1, slots, self.D.reshape(K, B * T, d)).view(K, B, self.rows, d)

    def weighted(self, weights: Tensor) -> Tensor:
        """``sum_ki weights[k, i] g[k, i]``, ``[V, d]``."""
        D = torch.einsum("kb,kbtd->btd", weights, self.D)
        table = D.new_zeros(self.rows, D.shape[-1])
        return table.index_add_(0, self.tokens.reshape(-1), D.reshape(-1, D.shape[-1]))

    def transposed(self, index: Tensor) -> Factor:
        return Dense(index, self.materialise().transpose(-1, -2))

    def as_linear(self) -> Linear:
        """The same gradients as a linear map of one-hot tokens (one output row per sample).

        Used to join an embedding with another linear use of the same table (a tied output head):
        the joined ghost form then holds their cross terms.
        """
        one_hot = torch.nn.functional.one_hot(self.tokens, self.rows).to(self.D.dtype)
        return Linear(self.index, self.D[0], one_hot.unsqueeze(0))

    def gramian(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """``[K*B, K*B]``, in the cheaper of the ghost and compact forms."""
        K, B, T, d = self.D.shape
        distinct = min(B * T, self.rows)  # an upper bound on U, known without a sync
        ghost = (
            B * B * T * T + cotangent_cost(K, B, T, d) < K * B * T * d + (K * B) ** 2 * distinct * d
        )
        if ghost or is_wrapped(self.tokens):  # tokens under vmap: no distinct tokens to find
            tokens = self.tokens

            def similarity(i: slice, j: slice) -> Tensor:
                return (tokens[i].reshape(-1, 1) == tokens[j].reshape(1, -1)).to(self.D.dtype)

            return ghost_from_similarity(similarity, self.D, chunk_bytes)
        G = self.D.new_zeros(K * B, K * B)  # stays zero without tokens
        for g in self._compact_blocks(chunk_bytes):
            G += dense_gramian(g)
        return G


RULES: dict[str, Rule] = {"embedding": embedding_rule}
