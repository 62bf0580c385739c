"""Weightings that ignore the values of the Gramian: ``mean``, ``sum``, ``constant``, ``random``."""

from __future__ import annotations

import torch
from torch import Tensor

from ._shapes import _uniform, _weighting


@_weighting("mean(G)")
def mean(G: Tensor) -> Tensor:
    """Uniform weights ``1/m``: the update is the average of the rows of the Jacobian.

    Args:
        G: Gramian ``[m, m]``, or generalized Gramian of shape ``S + S[::-1]`` (e.g.
            ``[B, K, K, B]``). Only its shape, dtype and device are used (and its values checked
            to be finite): a zero, rank-deficient or indefinite ``G`` changes nothing.

    Returns:
        Weights of shape ``S`` (``[m]``, ``[B, K]``, ...), all ``1/m`` with ``m = prod(S)``.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import mean
        >>> mean(torch.eye(4))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    return _uniform(G)


@_weighting("sum(G)")
def sum(G: Tensor) -> Tensor:
    """All-ones weights: the update is the sum of the rows of the Jacobian.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``. Only its shape, dtype and
            device are used (and its values checked to be finite).

    Returns:
        Weights of shape ``S``, all equal to 1.

    Examples:
        >>> import torch
        >>> from torchgram import weightings
        >>> weightings.sum(torch.eye(3))
        tensor([1., 1., 1.])
    """
    return torch.ones(G.shape[0], dtype=G.dtype, device=G.device)


@_weighting("constant(G, weights)", per_row=("weights",))
def constant(G: Tensor, *, weights: Tensor) -> Tensor:
    """Fixed weights, whatever the Gramian.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``. Only its shape, dtype and
            device are used (and its values checked to be finite).
        weights: The weights, of shape ``S`` or ``[m]``.

    Returns:
        ``weights`` reshaped to ``S``, in the dtype and on the device of ``G``.

    Raises:
        ValueError: If ``weights`` has neither shape ``S`` nor ``[m]``.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import constant
        >>> constant(torch.eye(2), weights=torch.tensor([1.0, 3.0]))
        tensor([1., 3.])
    """
    return weights


@_weighting("random(G)")
def random(G: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Random positive weights summing to 1: the softmax of a standard normal vector.

    This is Random Loss Weighting (Lin et al., 2022, arXiv:2111.10603, Algorithm 2).

    Under ``torch.func.vmap`` it needs ``randomness="different"`` or ``"same"`` and
    ``generator=None``: vmap does not support explicit generators.

    Args:
        G: Gramian ``[m, m]`` or generalized Gramian ``S + S[::-1]``. Only its shape, dtype and
            device are used (and its values checked to be finite).
        generator: The random number generator to draw from; ``None`` uses torch's global one.

    Returns:
        Weights of shape ``S``, positive and summing to 1.

    Examples:
        >>> import torch
        >>> from torchgram.weightings import random
        >>> w = random(torch.eye(3), generator=torch.Generator().manual_seed(0))
        >>> w.shape, bool(w.sum().isclose(torch.tensor(1.0)))
        (torch.Size([3]), True)
    """
    noise = torch.randn(G.shape[0], dtype=G.dtype, device=G.device, generator=generator)
    return torch.softmax(noise, dim=-1)
