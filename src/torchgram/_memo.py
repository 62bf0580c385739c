"""What a transform remembers between its calls: the shapes its probe learned.

Every call of a transform runs ``fn`` under the tape with one zero tap per tapped output, so it
must know those outputs' shapes first: a probe (one shape-only run of fn) learns them, and with
``batch_dim`` a check on two samples makes sure fn treats samples independently. A training loop
calls one transform (``gramian_of(fn)``, ``jd_grad(fn, ...)``) many times with arguments of the
same shapes, so each transform remembers, per signature of its arguments, what the probe learned
and whether the check passed. Nothing else is kept. The shapes cannot make a result wrong: the
real run checks every tap against the output it is added to, and if fn now uses its parameters
differently the entry is dropped and fn is probed again. The sample check is not repeated on a
signature where it passed. The memory belongs to the transform object, as ``jax.jit``'s cache
does (the one exception to "no state between calls", for a training loop's sake); the eager forms
(``gramian``, ``vjp_and_gramian``) remember nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from torchgram._pytree import Inputs
from torchgram._tape import TapShape

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
        attention: Whether fn calls attention (``scaled_dot_product_attention``, or a function
            that may call it out of the tape's sight), whose kernel must then be chosen.
        custom_function: Whether fn calls a custom ``autograd.Function`` (then the real run is
            made under ``torch.func``, which sees it as the probe did: one call).
        made_taps: Whether plain autograd without ``batch_dim`` may take the uses' outputs by
            their gradient edges (see :func:`torchgram._reverse.linearise_made_taps`): False
            once that failed on this signature.
    """

    tap_shapes: TapShapes
    shape: torch.Size
    samples_checked: bool = False
    record_shapes: list[torch.Size] = field(default_factory=list)
    output_tap_shapes: TapShapes = field(default_factory=list)
    batched: bool | None = None
    attention: bool = True
    custom_function: bool = False
    made_taps: bool = True


class Probes:
    """One transform's memory: :class:`Probed` for its ``size`` latest argument signatures."""

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


def signature(inputs: Inputs, batch_dim: int | None, has_aux: bool) -> Hashable | None:
    """Everything that can change which ops fn applies to the parameters, or None when some
    argument cannot be hashed (then nothing is remembered for that call)."""
    leaves = tuple(
        (x.shape, x.dtype, x.device) if isinstance(x, Tensor) else (type(x), x)
        for x in (*inputs.params, *inputs.data)
    )
    key = (
        batch_dim,
        has_aux,
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
