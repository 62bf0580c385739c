"""The run of fn without the tape: plain autograd on copies of the parameters, watched by the
tape's checks but not recorded (see ``torchgram._whole.linearise_to_params``).

Where later calls without ``batch_dim`` pull the rows back to the parameters themselves, no use
needs recording: autograd's own backward builds each row's gradient, and a recurrent op runs on
its fused kernel rather than step by step. Three things of the tape remain: attention on its math
kernel (the fused ones have no double backward, which a Gramian that carries a graph needs), its
checks
(``torchgram._guards``: a write into a tensor fn did not create hands the run back, a gradient
inside fn is refused), and its reading of fn's closure: fn may use the parameter tensors it was
given through a closure (a module's own parameters) instead of its argument, and such a use must
reach the copies whose gradients are taken, so each op that reads one gets the copy instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch

from torchgram._guards import Guard, Watching
from torchgram._ops.attention import is_attention, math_kernel
from torchgram._uses import may_mention, op_name

Tensor = torch.Tensor


class Watch(Watching):
    """Checks every op fn calls, and hands it the run's copies of the given parameters.

    Args:
        params: The parameter leaves the caller gave.
        own: The leaves fn runs on: ``params``, with copies that require grad of those that
            do not.
        caller: How to name the public call in error messages.
    """

    def __init__(self, params: Sequence[Tensor], own: Sequence[Tensor], caller: str) -> None:
        super().__init__()
        self.caller = caller
        self.guard = Guard(caller, per_sample=False)
        self.guard.start(watch=True)
        self._copies = {id(p): c for p, c in zip(params, own, strict=True) if c is not p}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._copies and may_mention(args, kwargs, self._copies):
            args, kwargs = optree.tree_map(self.copy, (args, kwargs), none_is_leaf=True)
        name = op_name(func)
        self.guard.before(func, name, args, kwargs)
        if is_attention(name):  # its fused kernels have no double backward (a Gramian that
            with math_kernel():  # carries a graph back to a tensor fn closes over)
                return self.guard.after(name, args, func(*args, **kwargs))
        return self.guard.after(name, args, func(*args, **kwargs))

    def copy(self, value: Any) -> Any:
        """The run's copy of ``value`` where it is a given parameter, else ``value`` (fn's
        output too: a given parameter returned as it is)."""
        return self._copies.get(id(value), value) if isinstance(value, Tensor) else value
