"""``embedding``: gradients that add each token's cotangent to the token's row of the table."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchgram._factors_embedding import Embedding
from torchgram._rules.common import Contribution, Rule
from torchgram._uses import DataRef, ParamView, Use

Tensor = torch.Tensor


def embedding_rule(
    use: Use, records: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Contribution] | None:
    """``torch.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)``.

    ``F.embedding(indices, weight, ...)`` is stepped into by the tape and records this builtin,
    whose first argument is the table. Rows at ``padding_idx`` get no gradient; with
    ``scale_grad_by_freq`` the generic rule takes over.
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


RULES: dict[str, Rule] = {"embedding": embedding_rule}
