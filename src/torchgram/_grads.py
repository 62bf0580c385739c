"""Hand a direction computed functionally to ``torch.optim``: write it into ``.grad``."""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import nn

Tensor = torch.Tensor


def set_grad(params: nn.Module | Any, grads: Any, /, *, accumulate: bool = False) -> None:
    """Write a gradient pytree into the ``.grad`` of parameters, so an optimiser can step.

    [`jd_grad`][torchgram.jd_grad] and ``vjp_fn`` return directions shaped like the parameters
    they were given; ``set_grad`` puts them where ``torch.optim`` optimisers read them:

        step = torchgram.jd_grad(losses, torchgram.weightings.upgrad, batch_dim=0)
        params = dict(model.named_parameters())
        torchgram.set_grad(model, step(params, x, y))
        optimizer.step()

    Args:
        params: An ``nn.Module`` (then ``grads`` maps parameter names, all or some of
            ``model.named_parameters()``, to tensors) or a pytree of tensors with the same
            structure as ``grads``.
        grads: The direction, shaped like ``params``.
        accumulate: Add to an existing ``.grad`` instead of replacing it (the convention of
            ``Tensor.backward``), e.g. to combine Jacobian descent on a trunk with ordinary
            gradients on heads.

    Examples:
        >>> import torch, torchgram
        >>> model = torch.nn.Linear(2, 1)
        >>> torchgram.set_grad(model, {"bias": torch.tensor([0.5])})
        >>> model.bias.grad
        tensor([0.5000])
    """
    if isinstance(params, nn.Module):
        named = dict(params.named_parameters())
        if not isinstance(grads, dict):
            raise TypeError(
                f"set_grad(module, grads): with a module, grads must be a dict from parameter "
                f"names to tensors, got {type(grads).__name__}. Pass the dict that jd_grad "
                "returned for dict(module.named_parameters())."
            )
        unknown = sorted(set(grads) - set(named))
        if unknown:
            raise ValueError(
                f"set_grad(module, grads): {unknown} are not parameters of the module. Its "
                f"parameters are {sorted(named)}."
            )
        pairs = [(name, named[name], grads[name]) for name in grads]
    else:
        leaves, spec = optree.tree_flatten(params, none_is_leaf=True)
        try:
            given = spec.flatten_up_to(grads)
        except ValueError as error:
            raise ValueError(
                f"set_grad(params, grads): grads must have the structure of params ({error})."
            ) from None
        paths = optree.tree_paths(params, none_is_leaf=True)
        pairs = list(zip(map(str, paths), leaves, given, strict=True))
    # a given gradient that is (a view of) some parameter's current .grad must not be
    # overwritten in place before it is read: those are cloned
    held = {p.grad.untyped_storage().data_ptr() for _, p, _ in pairs if p.grad is not None}
    for name, param, grad in pairs:
        if not isinstance(grad, Tensor) or grad.shape != param.shape:
            got = list(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            raise ValueError(
                f"set_grad: the gradient for {name} must be a tensor of shape "
                f"{list(param.shape)}, got {got}."
            )
        grad = grad.detach().to(param.dtype)
        current = param.grad
        if accumulate and current is not None:
            param.grad = current + grad
        elif current is not None and _reusable(current, param) and not _in(grad, held):
            # in place, as backward() accumulates: no new memory (a large block costs page
            # faults on every step)
            current.copy_(grad)
        else:
            param.grad = grad.clone()


def _in(tensor: Tensor, storages: set[int]) -> bool:
    """Whether ``tensor`` lies in one of the storages (by their data pointers)."""
    return tensor.untyped_storage().data_ptr() in storages


def _reusable(grad: Tensor, param: Tensor) -> bool:
    """Whether ``grad`` (a parameter's ``.grad``) can take a new gradient in place."""
    return (
        grad.shape == param.shape
        and grad.dtype == param.dtype
        and grad.device == param.device
        and not grad.requires_grad
        and grad.is_contiguous()
    )
