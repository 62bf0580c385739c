"""Convolution weights: the linear rule on unfolded input patches, one linear map per group.

A convolution with G groups is, per group ``g``, a linear map from patches of ``C_in / G`` input
channels to ``C_out / G`` output channels, used at every output position (the tokens). Its weight
``[C_out, C_in / G, *kernel]`` holds the G maps as blocks of output channels, so the Gramian is the
sum over groups of linear-map Gramians (ghost or materialised, whichever is cheaper). Patches are
built from the padded channels-last input on demand, for a chunk of samples at a time.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from torchgram._factors import (
    DEFAULT_CHUNK_BYTES,
    Dense,
    Factor,
    dense_gramian,
    ghost_gramian,
    use_ghost,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class Conv:
    """Per-sample gradients of a convolution weight.

    Attributes:
        index: Flat leaf positions of the ``[C_out, C_in / G, *kernel]`` region, or None.
        x: Padded input, channels last: ``[B, N, *padded, C_in]`` (N images per sample).
        D: Output cotangents ``[K, B, N * L, G, C_out / G]`` (L output positions per image).
        kernel: Kernel size per spatial dimension.
        stride: Stride per spatial dimension.
        dilation: Dilation per spatial dimension.
        out_size: Output size per spatial dimension.
    """

    index: Tensor | None
    x: Tensor
    D: Tensor
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    out_size: tuple[int, ...]

    @property
    def groups(self) -> int:
        return self.D.shape[3]

    def patches(self, samples: slice) -> Tensor:
        """``[b, N * L, G, prod(kernel) * C_in / G]`` (kernel offsets major, channels minor)."""
        x = self.x[samples]
        b, C = x.shape[0], x.shape[-1]
        pieces = []
        for offset in itertools.product(*(range(k) for k in self.kernel)):
            window = tuple(
                slice(o * dil, o * dil + s * (size - 1) + 1, s)
                for o, dil, s, size in zip(
                    offset, self.dilation, self.stride, self.out_size, strict=True
                )
            )
            pieces.append(x[(slice(None), slice(None), *window)])
        stacked = torch.stack(pieces, dim=-2)  # [b, N, *out, prod(kernel), C]
        G = self.groups
        grouped = stacked.reshape(b, -1, len(pieces), G, C // G).transpose(2, 3)
        return grouped.reshape(b, grouped.shape[1], G, -1)

    def _chunks(self, chunk_bytes: int) -> list[slice]:
        """Slices of samples whose patches take at most about ``chunk_bytes``."""
        B = self.x.shape[0]
        per_sample = self.x[0].numel() * math.prod(self.kernel) * self.x.element_size()
        step = max(1, min(B, chunk_bytes // max(per_sample, 1)))
        return [slice(i, i + step) for i in range(0, B, step)]

    def _to_leaf_layout(self, g: Tensor) -> Tensor:
        """``[..., G, C_out / G, prod(kernel) * C_in / G]`` -> ``[..., C_out, C_in/G, *kernel]``."""
        lead = g.shape[:-3]
        C_out = g.shape[-3] * g.shape[-2]
        g = g.reshape(*lead, C_out, *self.kernel, -1)
        return g.movedim(-1, len(lead) + 1)

    def _grads(self, chunk_bytes: int) -> Tensor:
        """Per-sample gradients ``[K, B, G, C_out / G, prod(kernel) * C_in / G]`` (own layout)."""
        parts = [
            torch.einsum("kblgo,blgd->kbgod", self.D[:, chunk], self.patches(chunk))
            for chunk in self._chunks(chunk_bytes)
        ]
        return torch.cat(parts, dim=1)  # out of place, so that an outer vmap can batch it

    def materialise(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """Per-sample gradients ``[K, B, C_out, C_in / G, *kernel]``."""
        return self._to_leaf_layout(self._grads(chunk_bytes))

    def weighted(self, weights: Tensor) -> Tensor:
        """``sum_ki weights[k, i] g[k, i]``, ``[C_out, C_in / G, *kernel]``."""
        D = torch.einsum("kb,kblgo->blgo", weights, self.D)
        total = sum(
            torch.einsum("blgo,blgd->god", D[chunk], self.patches(chunk))
            for chunk in self._chunks(DEFAULT_CHUNK_BYTES)
        )
        assert isinstance(total, Tensor)
        return self._to_leaf_layout(total)

    def transposed(self, index: Tensor) -> Factor:
        return Dense(index, self.materialise().transpose(-1, -2))

    def gramian(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """``[K*B, K*B]``: the sum over groups of ghost or materialised linear-map Gramians."""
        K, B, T, G, d_out = self.D.shape
        d_in = math.prod(self.kernel) * self.x.shape[-1] // G
        if not use_ghost(torch.Size((B, T, d_in)), torch.Size((K, B, T, d_out))):
            return dense_gramian(self._grads(chunk_bytes))  # the layout does not matter here
        A = self.patches(slice(None))
        parts = [ghost_gramian(A[:, :, g], self.D[..., g, :], chunk_bytes) for g in range(G)]
        return parts[0] if G == 1 else torch.stack(parts).sum(0)
