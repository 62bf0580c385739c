"""Attention (``scaled_dot_product_attention`` and the functions that call it: multi-head
attention, transformer layers). No rule of its own: the tape steps inside the composite functions
and records their projections, and attention itself mixes no parameter. What it needs is a kernel
that ``vmap`` can batch: the fused CPU kernels have no batching rule (forward or backward), and
vmap's fallback loops over the samples or rows (about 4x slower). Whether fn calls attention
also steers the choice of run (``torchgram._run``)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from torchgram._internals import math_attention


@functools.lru_cache(maxsize=1024)
def is_attention(name: str) -> bool:
    """scaled_dot_product_attention, or a function that may call it out of the tape's sight."""
    return "attention" in name or "transformer" in name


def math_kernel() -> contextlib.AbstractContextManager[Any]:
    """Attention on its math kernel, the one vmap can batch: for a run under vmap, or one whose
    pull-back is batched over several rows."""
    return math_attention()
