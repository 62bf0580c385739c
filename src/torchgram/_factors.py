"""Per-sample gradients of one parameter region, in the forms a Gramian can be built from.

Rows are indexed ``(k, i)``: ``k`` over the K non-batch output elements, ``i`` over the B samples,
flattened as ``k * B + i``. Every factor describes the gradients ``g[k, i]`` of the output row
``(k, i)`` with respect to a region of one parameter leaf.

- :class:`Linear`: ``g[k, i] = sum_t D[k, i, t]ᵀ A[i, t]`` (a linear map used on T tokens). Its
  Gramian has a ghost form that never builds ``g`` and a materialised form; the cheaper one is used.
- :class:`Dense`: ``g`` itself, ``[K, B, *region]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Linear:
    """``g[k, i] = sum_t D[k, i, t]ᵀ A[i, t]``, a ``[d_out, d_in]`` gradient.

    Attributes:
        index: Flat leaf positions of the ``[d_out, d_in]`` region, or None for the whole leaf.
        A: Activations ``[B, T, d_in]``.
        D: Output cotangents ``[K, B, T, d_out]``.
    """

    index: Tensor | None
    A: Tensor
    D: Tensor

    def transposed(self, index: Tensor) -> Factor:
        """The same gradients seen as ``[d_in, d_out]``, on the region ``index`` of that shape.

        With one output row per sample the roles of activations and cotangents swap; otherwise the
        gradients are materialised.
        """
        if self.D.shape[0] == 1:
            return Linear(index, self.D[0], self.A.unsqueeze(0))
        return Dense(index, self.materialise().transpose(-1, -2))

    def materialise(self) -> Tensor:
        """The per-sample gradients ``[K, B, d_out, d_in]``."""
        return torch.einsum("kbte,btd->kbed", self.D, self.A)

    def weighted(self, weights: Tensor) -> Tensor:
        """``sum_ki weights[k, i] g[k, i]``, ``[d_out, d_in]``, without forming ``g``."""
        D = torch.einsum("kb,kbte->bte", weights, self.D)
        return torch.einsum("bte,btd->ed", D, self.A)

    def gramian(self) -> Tensor:
        """``[K*B, K*B]`` Gramian of the gradients, in the cheaper of the two forms."""
        if ghost_cost(self.A.shape, self.D.shape) <= materialised_cost(self.A.shape, self.D.shape):
            return ghost_gramian(self.A, self.D)
        return dense_gramian(self.materialise())


@dataclass(frozen=True)
class Dense:
    """Materialised per-sample gradients ``g`` ``[K, B, *region]`` of a leaf region."""

    index: Tensor | None
    g: Tensor

    def transposed(self, index: Tensor) -> Dense:
        return Dense(index, self.g.transpose(-1, -2))

    def materialise(self) -> Tensor:
        return self.g

    def weighted(self, weights: Tensor) -> Tensor:
        return torch.tensordot(weights, self.g, dims=2)

    def gramian(self) -> Tensor:
        return dense_gramian(self.g)


Factor = Linear | Dense


def ghost_cost(a_shape: torch.Size, d_shape: torch.Size) -> int:
    """Multiply-adds of :func:`ghost_gramian` for activations ``[B, T, d_in]``."""
    K, B, T, d_out = d_shape
    d_in = a_shape[-1]
    return B * B * T * T * (d_in + K * K * d_out)


def materialised_cost(a_shape: torch.Size, d_shape: torch.Size) -> int:
    """Multiply-adds of building per-sample gradients, then their Gramian."""
    K, B, T, d_out = d_shape
    d_in = a_shape[-1]
    return K * B * T * d_in * d_out + (K * B) ** 2 * d_in * d_out


def ghost_gramian(A: Tensor, D: Tensor) -> Tensor:
    """``G[(k,i),(l,j)] = sum_ts <A[i,t], A[j,s]> <D[k,i,t], D[l,j,s]>`` without per-sample grads.

    Args:
        A: ``[B, T, d_in]``.
        D: ``[K, B, T, d_out]``.

    Returns:
        ``[K*B, K*B]``.
    """
    K, B, T, _ = D.shape
    if T == 1:
        a = A[:, 0]
        d = D[:, :, 0].reshape(K * B, -1)
        return (d @ d.T) * (a @ a.T).repeat(K, K)
    a = A.reshape(B * T, -1)
    d = D.reshape(K * B * T, -1)
    aa = (a @ a.T).view(1, B, T, 1, B, T)
    dd = (d @ d.T).view(K, B, T, K, B, T)
    return (aa * dd).sum(dim=(2, 5)).reshape(K * B, K * B)


def dense_gramian(g: Tensor) -> Tensor:
    """``[K*B, K*B]`` Gramian of materialised gradients ``[K, B, ...]``."""
    flat = g.reshape(g.shape[0] * g.shape[1], -1)
    return flat @ flat.T
