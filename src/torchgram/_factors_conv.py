"""Convolution weights: per-sample gradients by the backend's kernel, or the ghost form on patches.

A convolution with G groups is, per group ``g``, a linear map from patches of ``C_in / G`` input
channels to ``C_out / G`` output channels, used at every output position (the tokens). Its weight
``[C_out, C_in / G, *kernel]`` holds the G maps as blocks of output channels. Two forms:

- materialised: the per-sample gradients, one ``aten.convolution_backward`` (weight only) per row,
  then their Gramian; the JD direction is one such call for the whole batch;
- ghost: the sum over groups of linear-map ghost Gramians on unfolded patches (built from the
  padded channels-last input), cheaper when few output positions meet large channel counts.
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

    def materialise(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """Per-sample gradients ``[K, B, C_out, C_in / G, *kernel]``.

        One weight-gradient convolution (``aten.convolution_backward``) per row: the backend's
        kernel never unfolds the input, so this is about as fast as the weight gradient of one
        training step, where building patches then multiplying is several times slower.
        """
        K, B = self.D.shape[:2]
        images, grads = self._images(), self._output_grads()
        rows = [self._weight_grad(grads[k, i], images[i]) for k in range(K) for i in range(B)]
        return torch.stack(rows).view(K, B, *rows[0].shape)

    def weighted(self, weights: Tensor) -> Tensor:
        """``sum_ki weights[k, i] g[k, i]``, ``[C_out, C_in / G, *kernel]``: one convolution."""
        grads = torch.einsum("kb,kb...->b...", weights, self._output_grads())
        return self._weight_grad(grads.flatten(0, 1), self._images().flatten(0, 1))

    def _images(self) -> Tensor:
        """The padded input, channels first: ``[B, N, C_in, *padded]`` (contiguous, as the fast
        convolution kernels want it)."""
        return self.x.movedim(-1, 2).contiguous()

    def _output_grads(self) -> Tensor:
        """The cotangents as a convolution's output gradient: ``[K, B, N, C_out, *out]``."""
        K, B = self.D.shape[:2]
        N = self.x.shape[1]
        return self.D.reshape(K, B, N, *self.out_size, -1).movedim(-1, 3).contiguous()

    def _weight_grad(self, grad: Tensor, images: Tensor) -> Tensor:
        """The weight gradient of the (unpadded) convolution of ``images`` given ``grad``."""
        G = self.groups
        zeros = [0] * len(self.kernel)
        weight = images.new_empty(grad.shape[1], images.shape[1] // G, *self.kernel)  # a shape
        return torch.ops.aten.convolution_backward(
            grad, images, weight, None, list(self.stride), zeros, list(self.dilation), False,
            zeros, G, [False, True, False],
        )[1]  # fmt: skip

    def transposed(self, index: Tensor) -> Factor:
        return Dense(index, self.materialise().transpose(-1, -2))

    def gramian(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """``[K*B, K*B]``: the sum over groups of ghost or materialised linear-map Gramians."""
        K, B, T, G, d_out = self.D.shape
        d_in = math.prod(self.kernel) * self.x.shape[-1] // G
        if not use_ghost(torch.Size((B, T, d_in)), torch.Size((K, B, T, d_out))):
            return dense_gramian(self.materialise())
        A = self.patches(slice(None))
        parts = [ghost_gramian(A[:, :, g], self.D[..., g, :], chunk_bytes) for g in range(G)]
        return parts[0] if G == 1 else torch.stack(parts).sum(0)
