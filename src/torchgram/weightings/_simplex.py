"""What ``modo`` and ``sdmgrad`` share: the projection onto the simplex, and their state of weights
on it, checked once."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._shapes import _uniform


def _project_onto_simplex(y: Tensor) -> Tensor:
    """The point of the probability simplex ``{w >= 0, Σ w = 1}`` nearest to ``y`` [m], m >= 1.

    Sort-based: with ``u`` the entries of ``y`` in decreasing order and
    ``t_k = (u_1 + ... + u_k - 1) / k``, the projection is ``max(y - θ, 0)`` with ``θ = max_k t_k``.
    The usual rule takes ``θ = t_ρ`` at the first ``ρ`` with ``u_{ρ+1} <= t_ρ``; since
    ``t_{k+1} - t_k = (u_{k+1} - t_k) / (k + 1)``, ``t`` increases up to ``ρ`` and decreases after
    it, so ``t_ρ`` is the maximum. A maximum needs no data-dependent index or early exit, so this
    runs under ``vmap`` and ``torch.compile``.
    """
    u = torch.sort(y, descending=True).values
    k = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype, device=y.device)
    theta = ((torch.cumsum(u, dim=-1) - 1.0) / k).amax(dim=-1, keepdim=True)
    return (y - theta).clamp(min=0.0)


def _start(state: tuple[Tensor] | None, kind: type[Any], M: Tensor, call: str) -> Tensor:
    """The weights ``[m]`` on the simplex held by ``state``, a ``kind`` of one field, in the dtype
    and on the device of ``M`` [m, m]; the uniform ``1/m`` for ``state=None``."""
    m = M.shape[0]
    if state is None:
        return _uniform(M)
    if not isinstance(state, kind):
        raise TypeError(
            f"{call}: expected state to be a {kind.__name__} or None, got "
            f"{type(state).__name__}. Pass the state returned by the previous call."
        )
    (weights,) = state
    if weights.shape != (m,):
        raise ValueError(
            f"{call}: expected state.{kind._fields[0]} of shape [{m}], got "
            f"{list(weights.shape)}. The number of rows changed: start again with state=None."
        )
    return weights.to(dtype=M.dtype, device=M.device)
