"""Random ops: dropout and sampling. No rule of their own (dropout's mask is data to the ops
after it); what the run needs to know is whether fn drew random numbers, since two runs of fn
must then draw the same ones before their outputs can be compared (``torchgram._samples``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DROPOUTS = frozenset(
    {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
)
RANDOM_OPS = frozenset(
    {"bernoulli", "rand_like", "randn_like", "randint_like", "normal", "multinomial", "rand"}
    | {"randn", "randint", "randperm", "native_dropout", "uniform_", "normal_", "bernoulli_"}
)


def draws(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether this call of a dropout or a random op draws random numbers (dropout does in
    training mode with ``p > 0``)."""
    if name not in DROPOUTS:
        return name in RANDOM_OPS
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
    return bool(training) and float(p) > 0
