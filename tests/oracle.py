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


def row_by_row_gramian(fn: Callable[..., Any], params: Any, *args: Any) -> torch.Tensor:
    """``[m, m]`` Gramian from one ``torch.autograd.grad`` per output element: for ops whose
    backward ``torch.func.vmap`` gets wrong (``torch.cdist`` in torch 2.13), where ``jacrev`` is
    no oracle."""
    leaves, spec = optree.tree_flatten(params)
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    out = fn(optree.tree_unflatten(spec, leaves), *args).reshape(-1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], leaves, retain_graph=True)])
        for i in range(out.numel())
    ]
    J = torch.stack(rows)
    return J @ J.T


def differentiable_gramian(fn: Callable[..., Any], params: Any, *args: Any) -> torch.Tensor:
    """``[m, m]`` Gramian from one ``torch.autograd.grad(create_graph=True)`` per output
    element, differentiable with respect to the leaves of ``params`` (which must require grad):
    the oracle for gradients of the Gramian where ``jacrev``'s are wrong (layer_norm's affine
    weight in torch 2.13: its vmapped pull-back, differentiated again)."""
    leaves = optree.tree_leaves(params)
    out = fn(params, *args).reshape(-1)
    rows = []
    for i in range(out.numel()):
        grads = torch.autograd.grad(
            out[i], leaves, retain_graph=True, create_graph=True, allow_unused=True
        )
        rows.append(
            torch.cat(
                [
                    torch.zeros(leaf.numel(), dtype=out.dtype) if g is None else g.reshape(-1)
                    for g, leaf in zip(grads, leaves, strict=True)
                ]
            )
        )
    J = torch.stack(rows)
    return J @ J.T
