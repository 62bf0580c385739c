"""Elementwise ops with a parameter operand: scales, shifts and biases broadcast over the data.

Their parameters are small next to their output, so the tape puts the taps on the parameter
arguments (``torchgram._tape``): the pull-back then yields the per-sample gradients directly and
no rule is needed. (In a run on the whole batch a tap on a parameter would give the sum over the
samples; there they are tapped on their outputs and the generic rule applies.)"""

from __future__ import annotations

TAPPED_ON_PARAMS = frozenset(
    {
        "mul", "__mul__", "__rmul__", "multiply", "add", "__add__", "__radd__", "sub", "__sub__",
        "subtract", "__rsub__", "rsub", "div", "__truediv__", "__rdiv__", "true_divide",
        "divide",
    }
)  # fmt: skip
