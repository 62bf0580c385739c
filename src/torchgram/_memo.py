"""What a transform remembers between its calls: what its first call on a signature learned.

Every call runs ``fn`` under the tape, and the first call on a signature of the arguments learns
what later calls need: the shapes of the taps (from a shape-only probe, or the run itself), which
run to make (see ``torchgram._run``), and that fn passed the first call's checks. A training
loop calls one transform (``gramian_of(fn)``, ``jd_grad(fn, ...)``) many times with arguments of
the same shapes, so each transform remembers this per signature, and later calls run fn once.
The eager forms (``gramian``, ``vjp_and_gramian``) remember it per fn, weakly (see
``remembered``). Nothing else is kept: no tensor, nothing that holds fn or a model alive. The
shapes cannot make a result wrong: the real run checks every tap against the output it is added
to, and if fn now uses its parameters differently the entry is dropped and fn is run as on a
first call. The memory belongs to the transform object, as ``jax.jit``'s cache does (the one
exception to "no state between calls", for a training loop's sake).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchgram._pytree import Inputs
from torchgram._uses import TapShape

Tensor = torch.Tensor

TapShapes = list[TapShape]


@dataclass
class Probed:
    """What the probe learned about fn on one signature of its arguments.

    Attributes:
        tap_shapes: Shape, dtype and device of every tapped output, in order.
        shape: fn's output shape (given one sample with ``batch_dim``).
        samples_checked: Whether the sample check ran and passed.
        record_shapes: Shape of every recorded input of a use, in order.
        output_tap_shapes: The taps' shapes, dtypes and devices when every use is tapped on its
            outputs (as in the batched run), in order.
        batched: Whether the batched run (fn on the whole batch, without ``vmap``) gave the
            result on this signature: None before it was tried.
        custom_function: Whether fn calls a custom ``autograd.Function`` (then the real run is
            made under ``torch.func``, which sees it as the probe did: one call).
        made_taps: Whether plain autograd without ``batch_dim`` may take the uses' outputs by
            their gradient edges (see ``torchgram._reverse.linearise_made_taps``): False
            once that failed on this signature.
        random: Whether fn drew random numbers in the run the others were checked against
            (then the batched run may too: it was checked to draw what the others draw).
        apart: Whether the reverse pass pulls the rows back one at a time (else all at once):
            the faster on the first call, None before it was timed (see
            ``torchgram._reverse.pull_back``).
        to_params: Whether later calls without ``batch_dim`` run fn without the tape and pull
            the rows back to the parameters themselves (their gradients, one per row), rather
            than to the taps: chosen on the first call where the rules would build each row's
            gradient anyway (see ``torchgram._whole.gradients_pay``).
        inner: Positions of the batched run's records whose samples are the inner factor of a
            merged dimension (see ``torchgram._batched.as_stacked``), learned on its first call.
        looped: Whether fn runs sample by sample in a loop where it runs per sample, because
            ``vmap`` cannot run it (``vmap_error``: the first line of vmap's error).
    """

    tap_shapes: TapShapes
    shape: torch.Size
    samples_checked: bool = False
    record_shapes: list[torch.Size] = field(default_factory=list)
    output_tap_shapes: TapShapes = field(default_factory=list)
    batched: bool | None = None
    custom_function: bool = False
    made_taps: bool = True
    random: bool = False
    looped: bool = False
    vmap_error: str = ""
    apart: bool | None = None
    to_params: bool = False
    inner: frozenset[int] = frozenset()


class Probes:
    """One transform's memory: ``Probed`` for its ``size`` latest argument signatures."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: dict[Hashable, Probed] = {}

    def take(self, key: Hashable | None) -> Probed | None:
        """Remove and return what was learned on ``key`` (None if nothing, or no key)."""
        return None if key is None else self._entries.pop(key, None)

    def keep(self, key: Hashable | None, probed: Probed) -> None:
        """Remember ``probed`` on ``key`` as the latest entry, forgetting the oldest ones."""
        if key is None:
            return
        self._entries[key] = probed
        for old in list(self._entries)[: max(len(self._entries) - self.size, 0)]:
            del self._entries[old]

    def __len__(self) -> int:
        return len(self._entries)


_EAGER: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def remembered(fn: Callable[..., Any]) -> Probes:
    """The memory of the eager forms (``gramian``, ``vjp_and_gramian``) for ``fn``, kept as long
    as fn lives and no longer (weakly, as ``torch.compile`` keeps its caches per code object): a
    loop that calls them with the same fn runs it once per call, as a transform built once
    does. A bound method is remembered by its object and function (``model.forward`` is a new
    object each time it is read); a fn that cannot be referenced weakly, or is made anew on each
    call (a lambda in the loop), is remembered for that call only."""
    owner, key = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    if owner is None or key is None:
        owner, key = fn, None
    try:
        table = _EAGER.setdefault(owner, {})
    except TypeError:  # no weak reference to it
        return Probes()
    return table.setdefault(key, Probes())


def signature(
    inputs: Inputs, batch_dim: int | None, has_aux: bool, check_samples: bool
) -> Hashable | None:
    """Everything that can change which ops fn applies to the parameters (and whether the first
    call's checks are due), or None when some argument cannot be hashed (then nothing is
    remembered for that call)."""
    leaves = tuple(
        (x.shape, x.dtype, x.device) if isinstance(x, Tensor) else (type(x), x)
        for x in (*inputs.params, *inputs.data)
    )
    key = (
        batch_dim,
        has_aux,
        check_samples,
        torch.is_grad_enabled(),
        _autocast_state(),
        inputs.argnums,
        inputs.params_spec,
        inputs.data_spec,
        inputs.dims,
        leaves,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    """Whether autocast is on, and its dtype, on the devices it exists for: it changes the
    dtypes of ops' outputs, and so of the taps."""
    return tuple(
        (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _autocast_devices()
    )


@functools.cache
def _autocast_devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
