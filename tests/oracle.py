"""The oracle: the full Jacobian with torch.func.jacrev, then J Jᵀ (use float64)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch.func import jacrev


def jacobian_matrix(fn: Callable[..., Any], params: Any, *args: Any) -> torch.Tensor:
    """``[m, P]``: rows follow ``fn(params, *args).reshape(-1)``."""
    out = fn(params, *args)
    jac = jacrev(fn)(params, *args)
    m = out.numel()
    return torch.cat([j.reshape(m, -1) for j in optree.tree_leaves(jac)], dim=1)


def flat_gramian(fn: Callable[..., Any], params: Any, *args: Any) -> torch.Tensor:
    """``[m, m]`` Gramian of the Jacobian, from the oracle."""
    J = jacobian_matrix(fn, params, *args)
    return J @ J.T
