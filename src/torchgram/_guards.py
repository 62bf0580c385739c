"""What the tape checks on every op before it runs (the checks that belong to one op family
live in its module under ``torchgram._ops`` and are called from here).

- randomness (dropout in training, random sampling: ``_ops.random``), noted for the sample check;
- norms that mix samples under ``batch_dim`` or update running statistics inside their kernel
  (``_ops.norm``): refused, or their statistics saved to be put back;
- a gradient taken inside fn (``torch.autograd.grad``): refused;
- writes the Gramian cannot follow (an in-place op or ``out=`` reading a parameter): refused;
- when the run is plain autograd (no ``torch.func`` transform refuses them for us), writes into
  tensors fn did not create in this run (a buffer, an argument, a captured tensor): before such
  an op runs, ``NeedsTransform`` hands the run back so that it is made again under
  ``torch.func.vjp``, which refuses the write with its own error, or lets it through where the
  guess was wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import FunctionType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from torchgram._internals import active_modes, is_wrapped, tracked
from torchgram._ops.embedding import check_embedding
from torchgram._ops.norm import (
    WEIGHTED_NORMS,
    check_batch_norm,
    instance_norm_statistics,
)
from torchgram._ops.random import DROPOUTS, RANDOM_OPS, draws

Tensor = torch.Tensor

# What Guard._note looks at.
_NOTED = (
    DROPOUTS
    | RANDOM_OPS
    | WEIGHTED_NORMS
    | {"batch_norm", "instance_norm", "embedding", "custom_function_call", "grad", "backward"}
)
_GRADIENTS = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)
# In-place operators and item assignment (the other in-place ops end with "_").
_IN_PLACE_DUNDERS = frozenset(
    {
        "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__",
        "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
        "__ilshift__", "__irshift__",
    }
)  # fmt: skip


# Ops whose result may be their input itself, or share its memory without being a view (no
# ``_base``): the result of one applied to a tensor fn did not create is no tensor of fn's own.
_ALIASING = frozenset(
    {
        "detach", "data", "requires_grad_", "contiguous", "to", "double", "float", "half",
        "bfloat16", "cpu", "cuda", "type", "type_as", "as_tensor", "asarray",
    }
)  # fmt: skip


class NeedsTransform(Exception):
    """The plain-autograd run must be made under ``torch.func`` instead: an op is about to
    write into a tensor fn did not create in this run, or a parameter is used in a custom
    ``autograd.Function``'s forward where taps are made as the run goes."""


class Watching(TorchFunctionMode):
    """A mode that watches fn run (the tape, ``torchgram._watch.Watch``): one at a time."""

    caller: str

    def __enter__(self) -> Watching:
        if any(isinstance(mode, Watching) and mode is not self for mode in active_modes()):
            raise ValueError(
                f"{self.caller}: fn calls torchgram itself (a Gramian, vjp or jd_grad inside "
                "fn). The inner call's reverse pass runs outside the ops the outer call "
                "records, so the outer Gramian would miss how the inner result depends on the "
                "parameters. Compute the inner result outside fn and pass it in, or use "
                "torch.func.jacrev for the outer Jacobian."
            )
        return super().__enter__()  # type: ignore[return-value]


def restore(statistics: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Put back running statistics that a run updated (see ``Guard.statistics``), earliest
    value last (a tensor a run updated twice gets its value from before both)."""
    with torch.no_grad():
        for tensor, saved in reversed(statistics):
            tensor.copy_(saved)


def _variable(value: Any) -> bool:
    """Whether ``value`` is a tensor that may depend on the parameters: it requires grad, or a
    ``torch.func`` transform wraps it (a dual tensor of ``jvp`` requires no grad)."""
    if not isinstance(value, Tensor):
        return False
    return tracked(value) or is_wrapped(value)


def writes(name: str, kwargs: dict[str, Any]) -> bool:
    """Whether the op writes into one of its arguments (in place, or into ``out=``)."""
    return _in_place(name) or (bool(kwargs) and kwargs.get("out") is not None)


@functools.lru_cache(maxsize=1024)
def _in_place(name: str) -> bool:
    return name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


@functools.lru_cache(maxsize=1024)
def _noted(name: str) -> bool:
    """Whether ``Guard._note`` has something to note about an op of this name (it runs on
    every op fn calls: one lookup for the common op that needs nothing)."""
    return name in _NOTED


def writes_input(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether a function with an ``inplace`` flag (``F.relu(x, inplace=True)``) was asked to
    write into its input: the in-place op it calls then runs out of the tape's sight."""
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    if not isinstance(func, FunctionType):  # a builtin: its in-place forms end with "_"
        return False
    position = _inplace_position(func)
    return position is not None and len(args) > position and bool(args[position])


@functools.lru_cache(maxsize=256)
def _inplace_position(func: FunctionType) -> int | None:
    names = func.__code__.co_varnames[: func.__code__.co_argcount]
    return names.index("inplace") if "inplace" in names else None


class Guard:
    """The checks of one run; see the module docstring.

    Args:
        caller: How to name the public call in error messages.
        per_sample: Whether fn runs on one sample (``batch_dim`` set).
    """

    def __init__(self, caller: str, per_sample: bool) -> None:
        self.caller = caller
        self.per_sample = per_sample
        self.random = False
        self.custom_function = False
        self.weighted_norm = False  # a norm of WEIGHTED_NORMS whose weight or bias needs grad
        self.watch = False  # whether writes into tensors fn did not create are handed back
        # running statistics that a norm's kernel updates, each with its value before the run
        self.statistics: list[tuple[Tensor, Tensor]] = []
        self._created: set[int] = set()
        self._recorded: set[int] = set()

    def start(self, watch: bool) -> None:
        """A fresh run (``watch``: it is plain autograd)."""
        self.random = False
        self.custom_function = False
        self.weighted_norm = False
        self.watch = watch
        self.statistics = []
        self._created.clear()
        self._recorded.clear()

    def recorded(self, tensor: Tensor) -> None:
        """``tensor`` is the input of a parameter use: the Gramian is computed from it later."""
        self._recorded.add(id(tensor))
        if tensor._base is not None:
            self._recorded.add(id(tensor._base))

    def before(
        self, func: Callable[..., Any], name: str, args: Sequence[Any], kwargs: dict
    ) -> None:
        """Check an op before it runs."""
        if _noted(name):
            self._note(func, name, args, kwargs)
        if not (writes(name, kwargs) or writes_input(func, args, kwargs)):
            return
        target = kwargs.get("out", args[0] if args else None)
        if not isinstance(target, Tensor):
            return
        if self._recorded and self._records_meet(target):
            raise ValueError(
                f"{self.caller}: fn calls {name} in place on the input of an op that uses a "
                "parameter (or on a view of it), after that op. The Gramian is computed from "
                "each such input as it is at the end of the run, so the write would change it "
                "without changing fn's output. Use the out-of-place form (h = h + 1 for "
                "h.add_(1), inplace=False)."
            )
        if self.watch and not self._made_here(target):
            raise NeedsTransform(name)

    def _note(self, func: Callable[..., Any], name: str, args: Sequence[Any], kwargs: dict) -> None:
        """Note randomness, a custom Function or a weighted norm; check batch_norm."""
        if name in DROPOUTS or name in RANDOM_OPS:
            self.random |= draws(name, args, kwargs)
        elif name == "batch_norm":
            check_batch_norm(func, args, kwargs, self.caller, self.per_sample)
        elif name == "embedding":
            check_embedding(args, kwargs, self.caller, self.per_sample)
        elif name == "instance_norm":
            self.statistics.extend(
                instance_norm_statistics(func, args, kwargs, self.caller, self.per_sample)
            )
        elif func in _GRADIENTS:
            raise ValueError(
                f"{self.caller}: fn calls torch.autograd.{name} (a gradient inside fn, e.g. a "
                "gradient penalty). Its backward pass runs outside the ops the tape records, so "
                "the Gramian would miss how it depends on the parameters. Compute such a term "
                "outside fn, or use torch.func.jacrev on the whole loss for this Gramian."
            )
        elif name == "custom_function_call":  # an autograd.Function, as torch.func sees it
            self.custom_function = True
        if name in WEIGHTED_NORMS and not self.weighted_norm:  # a weight that may be a variable
            self.weighted_norm = any(_variable(v) for v in (*args[1:], *kwargs.values()))

    def after(self, name: str, args: Sequence[Any], result: Any) -> Any:
        """Remember the tensors an op returned as created in this run; return ``result``."""
        if not self.watch:
            return result
        if isinstance(result, Tensor):
            self._remember(name, args, result)
        elif isinstance(result, (tuple, list)):
            for x in result:
                if isinstance(x, Tensor):
                    self._remember(name, args, x)
        return result

    def _remember(self, name: str, args: Sequence[Any], result: Tensor) -> None:
        for arg in args:
            if result is arg:  # the op returned its input
                return
        if name in _ALIASING and args and isinstance(args[0], Tensor):
            if not self._made_here(args[0]):  # shares the memory of a tensor fn did not make
                return
        self._created.add(id(result))

    def _records_meet(self, target: Tensor) -> bool:
        base = target._base
        return id(target) in self._recorded or (base is not None and id(base) in self._recorded)

    def refuse_writes_reading_params(self, name: str, kwargs: dict[str, Any]) -> None:
        """Refuse an op that writes into a tensor while reading a parameter: its result is the
        written tensor, so a tap on it would not reach what the parameter changed (item
        assignment would silently lose the parameter), and its record could change."""
        if not writes(name, kwargs):
            return
        in_place = kwargs.get("out") is None
        raise ValueError(
            f"{self.caller}: fn calls {name} {'in place' if in_place else 'with out='} with a "
            "parameter among its arguments. The Gramian is computed from each use's result, and "
            "an op that writes into a tensor (or into the parameter itself) does not give one "
            "that can be tracked. Use the out-of-place form instead: h = h + w for h += w, "
            "h = h * w for h.mul_(w), torch.cat or torch.where instead of assigning a parameter "
            "into h[...]."
        )

    def _made_here(self, tensor: Tensor) -> bool:
        base = tensor._base
        return id(tensor) in self._created and (base is None or id(base) in self._created)
