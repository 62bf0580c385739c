"""The data model of a run: the uses of parameters that the tape records (``torchgram._tape``)
and the rules read (``torchgram._ops``), without the tape itself.

A ``Use`` is one call of a torch function that consumed parameters: its arguments with a
``ParamView`` in each parameter slot (which elements of which leaf) and a ``DataRef``
in each data slot (a recorded input), and where its taps lie.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch

Tensor = torch.Tensor

TapShape = tuple[torch.Size, torch.dtype, torch.device]


def op_name(func: Callable[..., Any]) -> str:
    """The name of a torch function as the tape sees it (``T`` for the ``Tensor.T`` getter)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


# Arguments that optree keeps as leaves (see torchgram._tape), and what a list or tuple argument
# holds beside tensors, seen without flattening.
SCALARS = frozenset({int, float, bool, complex, str, type(None), torch.dtype, torch.device})
_FLAT_ITEMS = SCALARS | {slice, type(Ellipsis)}


def may_mention(args: Sequence[Any], kwargs: dict[str, Any], ids: Any) -> bool:
    """False when no argument is a tensor whose id is in ``ids`` (a parameter or a view of
    one), seen without flattening: most ops take flat arguments, or a list of tensors (``cat``)
    or a tuple of slices (``x[:, :4]``), and this check runs on every op fn calls."""
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, Tensor):
            if id(value) in ids:
                return True
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, Tensor):
                    if id(item) in ids:
                        return True
                elif type(item) not in _FLAT_ITEMS:
                    return True  # nested deeper: flatten to see
        elif isinstance(value, dict):
            return True
    return False


@dataclass(frozen=True)
class ParamView:
    """A parameter leaf or a view of one, as one argument of a use.

    Attributes:
        leaf: Position of the leaf among the flattened parameters.
        tensor: The view itself (the leaf when ``index`` is None).
        index: Flat positions in the leaf of the view's elements, shaped like the view, on the CPU;
            None for the whole leaf in its own layout.
    """

    leaf: int
    tensor: Tensor
    index: Tensor | None


@dataclass(frozen=True)
class DataRef:
    """A non-parameter tensor argument of a use: its position among the tape's records."""

    record: int


@dataclass
class Use:
    """One call of a torch function that consumed parameters.

    Attributes:
        func: The function called.
        spec: Tree structure of ``(args, kwargs)``.
        leaves: Flattened ``(args, kwargs)``: constants stay, parameter slots hold a ParamView,
            non-parameter tensors a DataRef.
        data: Leaf positions that hold a DataRef.
        params: Leaf positions that hold a ParamView.
        out_spec: Tree structure of the output (None when ``on_params``).
        tapped: Output leaf positions that are floating-point tensors (and received a tap); with
            ``on_params``, the parameter slots (each received a tap).
        first_tap: Position of this use's first tap among all taps.
        on_params: Whether the taps went on the parameter arguments instead of the outputs, so
            that their cotangents are the per-sample gradients of the parameter views.
    """

    func: Callable[..., Any]
    spec: Any
    leaves: list[Any]
    data: list[int]
    params: list[int]
    out_spec: Any
    tapped: list[int]
    first_tap: int
    on_params: bool = False

    @property
    def name(self) -> str:
        return op_name(self.func)

    def arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the call, with ParamView and DataRef in place of tensors."""
        args, kwargs = optree.tree_unflatten(self.spec, self.leaves)
        return args, kwargs  # type: ignore[return-value]

    def call(self, params: Sequence[Tensor], data: Sequence[Tensor]) -> Any:
        """Run the op again with new parameter views and data (in the order of the slots)."""
        leaves = list(self.leaves)
        for slot, value in zip(self.params, params, strict=True):
            leaves[slot] = value
        for slot, value in zip(self.data, data, strict=True):
            leaves[slot] = value
        args, kwargs = optree.tree_unflatten(self.spec, leaves)
        return self.func(*args, **kwargs)


class TapeMismatch(RuntimeError):
    """fn used the parameters differently from the run that gave the shapes of the taps."""

    def __init__(self, caller: str) -> None:
        super().__init__(
            f"{caller}: fn used its parameters differently in two runs on the same inputs "
            "(different ops or shapes). fn must be deterministic in which ops it applies to the "
            "parameters."
        )


def differentiable(value: Any) -> bool:
    """Whether ``value`` is a tensor that can have gradients (floating-point or complex)."""
    return isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())


def positions(index: Tensor | None, shape: torch.Size) -> Tensor:
    """Flat leaf positions of a region: ``index``, or the whole leaf in its layout when None."""
    return torch.arange(shape.numel()).view(shape) if index is None else index
