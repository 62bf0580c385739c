"""What the rules share: their type, argument lookup and shape helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchgram._factors import Factor
from torchgram._uses import DataRef, ParamView, Use, positions

Tensor = torch.Tensor
Contribution = tuple[int, Factor]
Rule = Callable[[Use, Sequence[Tensor], Sequence[Tensor]], list[Contribution] | None]


def argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str) -> Any:
    """The argument at ``position`` or named ``name`` (None if absent)."""
    return args[position] if len(args) > position else kwargs.get(name)


def data_and_params(x: object, *params: object) -> bool:
    """The input is data and every parameter slot holds a parameter view or nothing."""
    return isinstance(x, DataRef) and all(p is None or isinstance(p, ParamView) for p in params)


def full_index(view: ParamView) -> Tensor:
    """The view's flat leaf positions, shaped like the view (also for a whole leaf)."""
    return positions(view.index, view.tensor.shape)


def transposed_region(view: ParamView) -> Tensor:
    """The flat leaf positions of a 2-D view's transpose."""
    return full_index(view).T


def tokens(x: Tensor, batch: int) -> Tensor:
    """``[B, ..., d]`` -> ``[B, T, d]``."""
    return x.reshape(batch, -1, x.shape[-1])
