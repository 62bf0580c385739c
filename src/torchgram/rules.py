"""Your own Gramian rules: how the per-sample gradients of one op's parameters are formed.

torchgram records every use of a parameter while fn runs, and turns each into per-sample
gradients with a rule. The built-in rules cover linear maps, convolutions, embeddings and norms;
every other op takes the generic rule, exact for any op but slower (the op's vjp under
``vmap``, which falls back to a loop over the samples for an op without a batching rule, such
as a ``torch.library`` custom op). ``register`` adds a rule for an op of yours without editing
torchgram: the rule receives the recorded call (``Call``) and returns, for each parameter
argument, its per-sample gradients in one of two forms:

- ``LinearGradients(A, D)``: the op is a linear map in that parameter, used on T tokens (the
  gradient ``sum_t D[k, i, t]ᵀ A[i, t]``); the Gramian then takes the cheaper of the ghost and
  the materialised forms, as for ``nn.Linear``.
- ``PerSampleGradients(g)``: the gradients themselves, ``[K, B, *shape]``.

A rule may return None to leave a call to the generic rule (a form it does not handle).
Registered rules take precedence over the built-in ones and apply to every later call of
``gramian``, ``gramian_of``, ``vjp_and_gramian`` and ``jd_grad``; register them once, at
import time, like Opacus's grad samplers. Test a rule against ``torch.func.jacrev`` in float64:
a wrong rule gives a wrong Gramian (torchgram cannot tell).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

from torchgram._ops import registered as _registered
from torchgram._ops.registered import Call, LinearGradients, PerSampleGradients, UserRule

__all__ = [
    "Call",
    "LinearGradients",
    "PerSampleGradients",
    "register",
    "registered",
    "unregister",
]


@overload
def register(op: Any, rule: None = None) -> Callable[[UserRule], UserRule]: ...


@overload
def register(op: Any, rule: UserRule) -> UserRule: ...


def register(op: Any, rule: UserRule | None = None) -> UserRule | Callable[[UserRule], UserRule]:
    """Register ``rule`` as the Gramian rule of ``op`` (or use as a decorator).

    Args:
        op: The function whose calls the rule handles: a ``torch.library`` custom op (its
            ``custom_op`` object, ``torch.ops.ns.name`` or an overload of it), a torch function
            (``torch.bilinear``), or a Python function that dispatches torch functions
            (``torch.nn.functional`` ones): the tape then records its calls whole instead of
            stepping inside. Registering again for the same op replaces the rule.
        rule: ``rule(call: Call) -> list[LinearGradients | PerSampleGradients] | None``, one
            entry per parameter argument (in the order of ``call.params``).

    Returns:
        ``rule`` (so that ``register(op)`` decorates a function and leaves it as it is).

    Raises:
        TypeError: ``rule`` (or ``op``) is not callable.

    Examples:
        A bilinear layer ``y[o] = x1ᵀ W[o] x2 + b[o]`` is linear in ``W`` with the activations
        ``x1 ⊗ x2``:

        >>> import torch
        >>> import torchgram
        >>> from torchgram.rules import LinearGradients, PerSampleGradients
        >>> @torchgram.rules.register(torch.bilinear)
        ... def bilinear_rule(call):
        ...     x1, x2, weight, bias = call.args[:4]
        ...     if call.kwargs or bias is None:
        ...         return None  # other forms: the generic rule
        ...     x1, x2 = call.tokens(x1), call.tokens(x2)  # [B, T, d1], [B, T, d2]
        ...     A = torch.einsum("bti,btj->btij", x1, x2).flatten(2)  # [B, T, d1 * d2]
        ...     D = call.cotangent.reshape(call.rows, call.batch, -1, weight.shape[0])
        ...     return [LinearGradients(A, D), PerSampleGradients(D.sum(2))]
        >>> layer = torch.nn.Bilinear(3, 4, 2)
        >>> params = dict(layer.named_parameters())
        >>> def losses(params, x1, x2):
        ...     out = torch.func.functional_call(layer, params, (x1, x2))
        ...     return out.pow(2).sum((1, 2))
        >>> G = torchgram.gramian(losses, params, torch.randn(5, 7, 3), torch.randn(5, 7, 4))
        >>> G.shape
        torch.Size([5, 5])
        >>> torchgram.rules.unregister(torch.bilinear) is bilinear_rule
        True
    """
    if not callable(op) and not isinstance(op, str):
        raise TypeError(
            f"register(op): op must be the function whose calls the rule handles, got "
            f"{type(op).__name__}."
        )

    def add(rule: UserRule) -> UserRule:
        if not callable(rule):
            raise TypeError(
                f"register(op, rule): rule must be a function of one Call, got "
                f"{type(rule).__name__}."
            )
        _registered.register(op, rule)
        return rule

    return add if rule is None else add(rule)


def unregister(op: Any) -> UserRule | None:
    """Remove the rule registered for ``op``; return it (None if there was none).

    Examples:
        >>> import torch
        >>> import torchgram
        >>> torchgram.rules.unregister(torch.bilinear) is None
        True
    """
    return _registered.unregister(op)


def registered() -> dict[Any, UserRule]:
    """The registered rules, a copy: ``{op: rule}``, a ``torch.library`` op keyed by its
    qualified name (``"mylib::op"``), any other op by itself.

    Examples:
        >>> import torchgram
        >>> torchgram.rules.registered()
        {}
    """
    return _registered.registered()
