"""Validation of Gramians and the flattening of generalized Gramians shared by all weightings."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_gramian(G: object, call: str) -> Tensor:
    """Raises if ``G`` is not a floating-point (generalized) Gramian, else returns it."""
    if not isinstance(G, Tensor):
        raise TypeError(
            f"{call}: expected G to be a torch.Tensor, got {type(G).__name__}. "
            "Pass the Gramian as a tensor, e.g. torch.as_tensor(G)."
        )
    if not G.is_floating_point():
        raise TypeError(
            f"{call}: expected a floating-point Gramian, got dtype {G.dtype}. "
            "Convert it first, e.g. G.to(torch.float32)."
        )
    k = G.ndim // 2
    if G.ndim % 2 != 0 or tuple(G.shape[k:]) != tuple(G.shape[:k])[::-1]:
        raise ValueError(
            f"{call}: expected a Gramian of shape S + S[::-1] (e.g. [m, m] or [B, K, K, B]), "
            f"got shape {list(G.shape)}. Pass the Gramian of the output, not the Jacobian."
        )
    return G


def _output_shape(G: Tensor) -> torch.Size:
    """The shape ``S`` of the output whose generalized Gramian ``G`` (shape ``S + S[::-1]``) is."""
    return G.shape[: G.ndim // 2]


def _flatten_gramian(G: Tensor) -> Tensor:
    """Flattens a generalized Gramian of shape ``S + S[::-1]`` into an ``[m, m]`` matrix.

    The second half of the dimensions is reversed so that both halves are indexed like the output,
    then both are flattened in row-major order. A 0-D Gramian becomes ``[1, 1]``.
    """
    k = G.ndim // 2
    m = math.prod(G.shape[:k])
    reversed_second_half = list(range(k)) + list(range(2 * k - 1, k - 1, -1))
    return G.permute(reversed_second_half).reshape(m, m)


def _unflatten_weights(w: Tensor, shape: torch.Size) -> Tensor:
    """Reshapes weights ``[m]`` back to the output shape ``S`` (0-D for a 0-D output)."""
    return w.reshape(shape)


def _to_matrix(G: object, call: str) -> tuple[Tensor, torch.Size]:
    """Validates ``G`` and returns its ``[m, m]`` flattening and the output shape ``S``."""
    G = _check_gramian(G, call)
    return _flatten_gramian(G), _output_shape(G)


def _check_vector(value: object, shape: torch.Size, like: Tensor, call: str, name: str) -> Tensor:
    """Validates a per-output option (e.g. a preference vector) and returns it flattened to [m].

    ``value`` may have the output shape ``S`` or the flattened shape ``[m]``. It is cast to the
    dtype and device of ``like``.
    """
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{call}: expected {name} to be a torch.Tensor or None, got {type(value).__name__}. "
            f"Pass {name}=torch.tensor([...])."
        )
    m = math.prod(shape)
    if value.shape != shape and value.shape != (m,):
        raise ValueError(
            f"{call}: expected {name} of shape {list(shape)} (the shape of the weights) or [{m}], "
            f"got shape {list(value.shape)}. Give one entry per row of the Jacobian."
        )
    return value.reshape(m).to(dtype=like.dtype, device=like.device)


def _check_in_range(value: float, low: float, high: float, call: str, name: str) -> None:
    """Raises a ValueError if ``value`` is not within ``[low, high]``."""
    if not low <= value <= high:
        raise ValueError(f"{call}: expected {name} in [{low}, {high}], got {value!r}.")


def _check_positive_int(value: int, call: str, name: str, minimum: int = 1) -> None:
    """Raises if ``value`` is not an int of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{call}: expected {name} to be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{call}: expected {name} >= {minimum}, got {value}.")
