"""Convolution weights: per-sample gradients by the backend's kernel, or the ghost form on patches.

A convolution with G groups is, per group ``g``, a linear map from patches of ``C_in / G`` input
channels to ``C_out / G`` output channels, used at every output position (the tokens). Its weight
``[C_out, C_in / G, *kernel]`` holds the G maps as blocks of output channels. Two forms:

- materialised: the per-sample gradients, a block of output channels at a time (at most
  ``chunk_bytes`` of them), and the sum of the blocks' Gramians. A block comes from batched
  products with the unfolded patches (few input channels, patches within ``chunk_bytes``), from
  one grouped ``aten.convolution_backward`` (weight only) per output row with the samples as
  groups (up to 64 x 128 channels per group), or else from one such call per row (see
  ``Conv.kernel_for_gradients``); for one input channel per group (depthwise), from one
  forward convolution with the cotangents as kernels. The kernels never unfold the input. The
  JD direction is one call for the whole batch;
- ghost: the sum over groups of linear-map ghost Gramians, cheaper when few output positions
  meet large channel counts, with the token similarities from unfolded patches or, for stride
  1, from pixel similarities (see ``Conv.form``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torchgram._factors import (
    DEFAULT_CHUNK_BYTES,
    Dense,
    Factor,
    Kept,
    Linear,
    common,
    ghost_cost,
    ghost_from_similarity,
    ghost_gramian,
    materialised_cost,
    use_ghost,
)

Tensor = torch.Tensor

# Measured on CPU (oneDNN): the unfolded-patch products beat the kernels for layers with few input
# channels (a network's first layer), and the grouped kernel (samples as groups) beats one kernel
# call per row for layers of up to about 64 x 128 channels per group, and loses beyond.
_FEW_CHANNELS = 16
_GROUPED_CHANNELS = 64 * 128
# The cost model counts one gathered element of the pixel form as this many multiply-adds (a
# gather is memory-bound, a product is not).
_GATHER_COST = 8


@dataclass(frozen=True)
class Conv:
    """Per-sample gradients of a convolution weight.

    Attributes:
        index: Flat leaf positions of the ``[C_out, C_in / G, *kernel]`` region, or None.
        x: Input ``[B, N, C_in, *spatial]`` (N images per sample), before ``padding``.
        dy: Output cotangents ``[K, B, N, C_out, *out]``.
        kernel: Kernel size per spatial dimension.
        stride: Stride per spatial dimension.
        padding: Zero padding per spatial dimension, on both sides.
        dilation: Dilation per spatial dimension.
        groups: G.
    """

    index: Tensor | None
    x: Tensor
    dy: Tensor
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def __post_init__(self) -> None:
        common(self, "x", "dy")

    def materialise(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """Per-sample gradients ``[K, B, C_out, C_in / G, *kernel]`` (needed whole, so built in
        one block)."""
        K, B = self.dy.shape[:2]
        kernel = self.kernel_for_gradients(chunk_bytes)
        c_in = self.x.shape[2] // self.groups
        if kernel == "patches":  # blocks [K*B, d * c] laid out [K, B, d, c]: join the c
            d = c_in * math.prod(self.kernel)
            blocks = [g.view(K, B, d, -1) for g in self._patch_blocks(chunk_bytes)]
            return torch.cat(blocks, dim=-1).transpose(-1, -2).reshape(K, B, -1, c_in, *self.kernel)
        (g,) = self._blocks_by(kernel)(None)
        return g.reshape(K, B, -1, c_in, *self.kernel)

    def as_linear(self) -> Linear:
        """The same gradients as a linear map of the unfolded patches (G = 1): activations
        ``[B, T, C_in * prod(kernel)]``, cotangents ``[K, B, T, C_out]``, ``T = N * prod(out)``
        tokens. What a cross-Gramian of two batches reads (``torchgram._assemble_cross``)."""
        K, B, _, C_out = self.dy.shape[:4]
        patches = self._channel_patches().transpose(1, 2)  # [B, T, d]
        D = self.dy.movedim(3, -1).reshape(K, B, -1, C_out)
        index = None if self.index is None else self.index.reshape(C_out, -1)
        return Linear(index, patches, D)

    def weighted(self, weights: Tensor) -> Tensor:
        """``sum_ki weights[k, i] g[k, i]``, ``[C_out, C_in / G, *kernel]``: one convolution
        (for a depthwise weight, the per-sample gradients of the weighted cotangents by
        ``_depthwise_blocks``, summed; ``bench_conv.py`` times it against the backend's)."""
        grads = torch.einsum("kb,kb...->b...", weights, self.dy)
        if self.kernel_for_gradients(DEFAULT_CHUNK_BYTES) == "depthwise":
            B, C_out = grads.shape[0], grads.shape[2]
            blocks = self._depthwise_blocks(DEFAULT_CHUNK_BYTES, grads.unsqueeze(0))
            return torch.cat([g.view(B, -1).sum(0) for g in blocks]).view(C_out, 1, *self.kernel)
        return self._weight_grad(
            grads.flatten(0, 1).contiguous(), self.x.flatten(0, 1).contiguous(), self.groups
        )

    def transposed(self, index: Tensor) -> Factor:
        return Dense(index, self.materialise().transpose(-1, -2))

    def gramian(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
        """``[K*B, K*B]``: a ghost form, or the sum of the blocks' materialised Gramians."""
        form = self.form()
        if form != "materialised":
            return self._ghost(chunk_bytes, pixels=form == "pixels")
        return self.gramian_keeping(chunk_bytes, None)

    def reuse_gain(self) -> float:
        """How many times less work weighting kept per-sample gradients takes than ``weighted``
        (``T / K``: its convolution sums over the T output positions), where the Gramian
        builds them (the materialised form); else 0."""
        K, _, N = self.dy.shape[:3]
        T = N * math.prod(self.dy.shape[4:])
        return T / K if self.form() == "materialised" else 0.0

    def gradient_element_size(self) -> int:
        """Bytes per element of the per-sample gradients it builds (the promoted dtype of
        ``x`` and ``dy``)."""
        return self.x.element_size()

    def gramian_keeping(self, chunk_bytes: int, keep: list[Kept] | None) -> Tensor:
        """The materialised form: the sum of the blocks' Gramians, each block appended to
        ``keep`` (unless None) for the direction."""
        kernel = self.kernel_for_gradients(chunk_bytes)
        rows = functools.partial(self._weight_rows, transposed=kernel == "patches")
        total: Tensor | None = None
        for g in self._blocks_by(kernel)(chunk_bytes):
            if keep is not None:
                keep.append(Kept(g, rows))
            part = g @ g.T
            total = part if total is None else total + part
        assert total is not None
        return total

    def _weight_rows(self, v: Tensor, transposed: bool) -> Tensor:
        """A block's weighted gradient ``[n]`` as weight rows ``[c, C_in / G, *kernel]``; a
        block of the patch products is laid out ``[C_in / G * prod(kernel), c]``."""
        c_in = self.x.shape[2] // self.groups
        if transposed:
            v = v.view(c_in * math.prod(self.kernel), -1).T
        return v.reshape(-1, c_in, *self.kernel)

    def form(self) -> str:
        """The cheapest form by the cost model, per group: ``"materialised"``, or the ghost form
        with its token similarities from ``"patches"`` (``<patch, patch>``) or, for stride 1,
        from ``"pixels"`` (one ``<pixel, pixel>`` product per pair of input pixels, then a sum
        over the kernel offsets of gathered entries: ``prod(kernel)`` times fewer products)."""
        K, B, N, C_out = self.dy.shape[:4]
        T = N * math.prod(self.dy.shape[4:])
        c_in = self.x.shape[2] // self.groups
        a = torch.Size((B, T, math.prod(self.kernel) * c_in))
        d = torch.Size((K, B, T, C_out // self.groups))
        pixels = None
        if all(s == 1 for s in self.stride):
            M = N * (math.prod(self.x.shape[3:]) + 1)  # pixels of a sample, with a zero one
            gathers = math.prod(self.kernel) * (B * T * B * M + (B * T) ** 2)
            pixels = B * B * M * M * c_in + _GATHER_COST * gathers + ghost_cost(a, d)
            pixels -= B * B * T * T * a[-1]  # the patch similarity it replaces
        ghost = "patches" if use_ghost(a, d, materialised_weight=1) else "materialised"
        rival = ghost_cost(a, d) if ghost == "patches" else materialised_cost(a, d)
        return "pixels" if pixels is not None and pixels < rival else ghost

    def kernel_for_gradients(self, chunk_bytes: int) -> str:
        """How the materialised form builds per-sample gradients: ``"patches"``, ``"grouped"``,
        ``"depthwise"`` or ``"rows"`` (see the module docstring; thresholds measured on CPU
        with oneDNN)."""
        B, N = self.x.shape[:2]
        G = self.groups
        c_in, c_out = self.x.shape[2] // G, self.dy.shape[3] // G
        T = N * math.prod(self.dy.shape[4:])
        patch_bytes = B * T * math.prod(self.kernel) * c_in * G * self.x.element_size()
        if G == 1 and patch_bytes <= chunk_bytes and c_in < _FEW_CHANNELS:
            return "patches"
        if G > 1 and c_in == 1 and self._slow_depthwise_kernel():
            return "depthwise"
        if c_in * c_out <= _GROUPED_CHANNELS:
            return "grouped"
        return "patches" if G == 1 and patch_bytes <= chunk_bytes else "rows"

    def _patch_blocks(self, chunk_bytes: int) -> Iterator[Tensor]:
        """Like ``_blocks`` (in another layout of each gradient), by batched products with
        the unfolded patches: faster than the kernel when the patches are small (G = 1)."""
        K, B, _, C_out = self.dy.shape[:4]
        P = self._channel_patches()  # [B, d_in, T]
        D = self.dy.movedim(3, 2).reshape(K, B, C_out, -1)  # [K, B, C_out, T]
        per_channel = K * B * P.shape[1] * P.element_size()
        step = max(1, chunk_bytes // per_channel)
        for start in range(0, C_out, step):
            g = torch.matmul(P, D[:, :, start : start + step].transpose(-1, -2))  # [K, B, d, c]
            yield g.reshape(K * B, -1)

    def _channel_patches(self) -> Tensor:
        """``[B, C_in * prod(kernel), N * L]`` for G = 1: the patches with the tokens minor, copied
        from one strided view of the padded input (over 15x faster than ``F.unfold`` on CPU, and
        the layout the batched products read fastest)."""
        B, N, C = self.x.shape[:3]
        x = self._padded()  # [B, N, C, *padded]
        out = self.dy.shape[4:]
        strides = x.stride()
        spatial = strides[3:]
        view = x.as_strided(
            (B, C, *self.kernel, N, *out),
            (
                strides[0],
                strides[2],
                *(d * s for d, s in zip(self.dilation, spatial, strict=True)),
                strides[1],
                *(t * s for t, s in zip(self.stride, spatial, strict=True)),
            ),
            x.storage_offset(),
        )
        return view.reshape(B, C * math.prod(self.kernel), N * math.prod(out))

    def _ranges(self, chunk_bytes: int | None) -> Iterator[tuple[int, int, int, int]]:
        """``(start, stop, first, count)``: consecutive blocks of output channels ``start:stop``
        (whole groups ``first:first + count`` when G > 1) whose per-row gradients take about
        ``chunk_bytes`` (None: one block)."""
        K, B, _, C_out = self.dy.shape[:4]
        G = self.groups
        per_group = C_out // G
        c_in = self.x.shape[2] // G
        per_channel = K * B * c_in * math.prod(self.kernel) * self.dy.element_size()
        step = C_out if chunk_bytes is None else max(1, chunk_bytes // per_channel)
        if G > 1:  # a block holds whole groups, so that its input channels are contiguous
            step = max(1, step // per_group) * per_group
        for start in range(0, C_out, step):
            stop = min(C_out, start + step)
            first, count = (start // per_group, (stop - start) // per_group) if G > 1 else (0, 1)
            yield start, stop, first, count

    def _blocks(self, chunk_bytes: int | None) -> Iterator[Tensor]:
        """Per-row gradients ``[K*B, c * C_in / G * prod(kernel)]`` of consecutive blocks of c
        output channels, one weight-gradient convolution per row and block."""
        K, B = self.dy.shape[:2]
        c_in = self.x.shape[2] // self.groups
        images = self.x.contiguous()  # [B, N, C_in, *spatial]
        grads = self.dy.contiguous()  # [K, B, N, C_out, *out]
        for start, stop, first, count in self._ranges(chunk_bytes):
            block_images = images[:, :, first * c_in : (first + count) * c_in].contiguous()
            block_grads = grads[:, :, :, start:stop].contiguous()
            block = [
                self._weight_grad(block_grads[k, i], block_images[i], count)
                for k in range(K)
                for i in range(B)
            ]
            yield torch.stack(block).view(K * B, -1)

    def _grouped_blocks(self, chunk_bytes: int | None) -> Iterator[Tensor]:
        """Like ``_blocks``, with one grouped weight-gradient convolution per output row
        ``k`` and block: the samples become groups (channels ``i * C_in + c``), so the kernel
        returns the B per-sample gradients at once."""
        K, B, N = self.dy.shape[:3]
        c_in = self.x.shape[2] // self.groups
        spatial, out = self.x.shape[3:], self.dy.shape[4:]
        for start, stop, first, count in self._ranges(chunk_bytes):
            images = self.x[:, :, first * c_in : (first + count) * c_in]
            images = images.transpose(0, 1).reshape(N, B * count * c_in, *spatial)
            block = []
            for k in range(K):
                grads = self.dy[k, :, :, start:stop].transpose(0, 1)
                grads = grads.reshape(N, B * (stop - start), *out)
                # reshape: the gradient is channels-last where the input was
                block.append(self._weight_grad(grads, images, B * count).reshape(B, -1))
            yield torch.cat(block) if K > 1 else block[0]

    def _blocks_by(self, kernel: str) -> Callable[..., Iterator[Tensor]]:
        """The generator of per-row gradient blocks of ``kernel`` (``kernel_for_gradients``)."""
        return {
            "patches": self._patch_blocks,
            "grouped": self._grouped_blocks,
            "depthwise": self._depthwise_blocks,
        }.get(kernel, self._blocks)

    def _slow_depthwise_kernel(self) -> bool:
        """Whether the backend's depthwise weight-gradient kernel is the slow one for this
        layer: oneDNN has a fast one for 3 x 3 kernels without dilation over outputs of more
        than 4 positions, and takes 3-10x longer than ``_depthwise_blocks`` for the 5 x 5 and
        7 x 7 kernels of MobileNet and ConvNeXt (``bench_conv.py``, CPU, 2-D)."""
        three = all(k == 3 for k in self.kernel) and all(d == 1 for d in self.dilation)
        return not three or math.prod(self.dy.shape[4:]) <= 4

    def _depthwise_blocks(
        self, chunk_bytes: int | None, dy: Tensor | None = None
    ) -> Iterator[Tensor]:
        """Like ``_blocks``, for one input channel per group: sample i's gradient for output
        channel o is the correlation of its input channel with its cotangent, so all of them
        come from one forward convolution (``_correlate``) of the padded inputs, channels
        ``(i, c)`` with the N images as a group's input channels, with the cotangents as
        kernels. ``dy`` replaces the cotangents (``[K', B, N, C_out, *out]``)."""
        dy = self.dy if dy is None else dy
        K, B = dy.shape[:2]
        multiplier = dy.shape[3] // self.groups
        x = self._cropped()  # [B, N, C_in, *padded]
        for start, stop, first, count in self._ranges(chunk_bytes):
            images = x[:, :, first : first + count].transpose(1, 2)  # [B, c, N, *padded]
            kernels = dy[:, :, :, start:stop].unflatten(3, (count, multiplier))
            kernels = kernels.permute(1, 3, 4, 0, 2, *range(5, dy.dim() + 1))
            g = self._correlate(images.flatten(0, 2), kernels.flatten(0, 3), B * count)
            g = g.reshape(B, count * multiplier, K, -1).permute(2, 0, 1, 3)
            yield g.reshape(K * B, -1)

    def _correlate(self, images: Tensor, kernels: Tensor, groups: int) -> Tensor:
        """``[channels, *kernel]``: the correlation of ``images`` ``[groups * n, *cropped]``
        with ``kernels`` ``[channels, n, *out]``, in ``groups`` groups: a convolution with the
        cotangents as kernels, stride and dilation swapped, whose output is the kernel's size."""
        zeros = [0] * len(self.kernel)
        return torch.convolution(
            images.unsqueeze(0), kernels, None, list(self.dilation), zeros, list(self.stride),
            False, zeros, groups,
        )[0]  # fmt: skip

    def _cropped(self) -> Tensor:
        """The padded input ``[B, N, C_in, *size]`` cut to the pixels some output reads: the
        correlation of ``_correlate`` then comes out exactly the kernel's size."""
        x = self._padded()
        sizes = zip(self.stride, self.dy.shape[4:], self.dilation, self.kernel, strict=True)
        for dim, (s, o, d, k) in enumerate(sizes, start=3):
            x = x.narrow(dim, 0, s * (o - 1) + d * (k - 1) + 1)
        return x

    def _weight_grad(self, grad: Tensor, images: Tensor, groups: int) -> Tensor:
        """The weight gradient of the convolution of ``images`` given its output's ``grad``."""
        channels = images.shape[1] // groups
        weight = images.new_empty(grad.shape[1], channels, *self.kernel)  # only a shape
        return torch.ops.aten.convolution_backward(
            grad, images, weight, None, list(self.stride),
            list(self.padding), list(self.dilation), False, [0] * len(self.kernel), groups,
            [False, True, False],
        )[1]  # fmt: skip

    def _ghost(self, chunk_bytes: int, pixels: bool) -> Tensor:
        """The sum over groups of linear-map ghost Gramians, the token similarities from
        unfolded patches or (stride 1) from pixel similarities."""
        K, B, _, C_out = self.dy.shape[:4]
        G = self.groups
        D = self.dy.movedim(3, -1).reshape(K, B, -1, G, C_out // G)
        if pixels:
            index = self._pixel_index()
            T, M = D.shape[2], self.x.shape[1] * (math.prod(self.x.shape[3:]) + 1)
            built = M * M + T * M  # per pair of samples: pixel products, then rows gathered
            parts = [
                ghost_from_similarity(
                    self._pixel_similarity(g, index), D[..., g, :], chunk_bytes, built
                )
                for g in range(G)
            ]
        else:
            A = self._patches()
            parts = [ghost_gramian(A[:, :, g], D[..., g, :], chunk_bytes) for g in range(G)]
        return parts[0] if G == 1 else torch.stack(parts).sum(0)

    def _pixel_index(self) -> list[Tensor]:
        """For each kernel offset, the input pixel under it at every token (image n, output
        position t) of a sample, as a position among the sample's N * (P + 1) pixels (P per
        image, then a zero one for positions in the padding). Stride 1."""
        N, spatial, out = self.x.shape[1], self.x.shape[3:], self.dy.shape[4:]
        P = math.prod(spatial)
        device = self.x.device
        grids = torch.meshgrid(*(torch.arange(n, device=device) for n in out), indexing="ij")
        images = torch.arange(N, device=device).unsqueeze(1) * (P + 1)
        index = []
        for offset in itertools.product(*(range(k) for k in self.kernel)):
            flat = torch.zeros(tuple(out), dtype=torch.long, device=device)
            valid = torch.ones(tuple(out), dtype=torch.bool, device=device)
            dims = zip(grids, offset, self.padding, self.dilation, spatial, strict=True)
            for grid, o, pad, dil, size in dims:
                position = grid - pad + o * dil
                valid &= (position >= 0) & (position < size)
                flat = flat * size + position
            flat = torch.where(valid, flat, P).reshape(1, -1)
            index.append((images + flat).reshape(-1))
        return index

    def _pixel_similarity(self, g: int, index: list[Tensor]) -> Callable[[slice, slice], Tensor]:
        """``<patch[i, t], patch[j, s]> = sum_o <x[i, t + o], x[j, s + o]>`` for group g, from
        one product of the two blocks' pixels and a gather per kernel offset o."""
        B, C = self.x.shape[0], self.x.shape[2]
        c = C // self.groups
        x = self.x[:, :, g * c : (g + 1) * c].flatten(3).transpose(2, 3)  # [B, N, P, c]
        x = F.pad(x, (0, 0, 0, 1)).reshape(B, -1, c)  # a zero pixel after each image's
        M = x.shape[1]

        def similarity(i: slice, j: slice) -> Tensor:
            rows, cols = x[i], x[j]
            Q = rows.reshape(-1, c) @ cols.reshape(-1, c).T  # [b_i * M, b_j * M]
            S: Tensor | None = None
            for at in index:  # row then column gathers of a 2-D tensor: the fast kernels
                part = Q.index_select(0, _in_block(at, len(rows), M))
                part = part.index_select(1, _in_block(at, len(cols), M))
                S = part if S is None else S + part
            assert S is not None
            return S

        return similarity

    def _padded(self) -> Tensor:
        """The input with its zero padding: ``[B, N, C_in, *padded]``."""
        B, N = self.x.shape[:2]
        pad = [p for p in reversed(self.padding) for _ in range(2)]
        return F.pad(self.x.flatten(0, 1), pad).unflatten(0, (B, N))

    def _patches(self) -> Tensor:
        """``[B, N * L, G, prod(kernel) * C_in / G]`` (kernel offsets major, channels minor)."""
        B, C = self.x.shape[0], self.x.shape[2]
        x = self._padded().movedim(2, -1)
        sizes = list(zip(self.dilation, self.stride, self.dy.shape[4:], strict=True))
        pieces = []
        for offset in itertools.product(*(range(k) for k in self.kernel)):
            window = tuple(
                slice(o * dil, o * dil + s * (size - 1) + 1, s)
                for o, (dil, s, size) in zip(offset, sizes, strict=True)
            )
            pieces.append(x[(slice(None), slice(None), *window)])
        stacked = torch.stack(pieces, dim=-2)  # [B, N, *out, prod(kernel), C]
        G = self.groups
        grouped = stacked.reshape(B, -1, len(pieces), G, C // G).transpose(2, 3)
        return grouped.reshape(B, grouped.shape[1], G, -1)


def _in_block(index: Tensor, samples: int, pixels: int) -> Tensor:
    """A sample's pixel positions ``index`` for each of ``samples`` consecutive samples of
    ``pixels`` pixels each, flattened."""
    starts = torch.arange(samples, device=index.device).unsqueeze(1) * pixels
    return (starts + index).reshape(-1)
