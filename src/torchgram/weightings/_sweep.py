"""The sweep shared by ``pcgrad`` and ``gradvac``: every row meets the other rows in its own order.

Row ``i`` of the Jacobian is replaced by ``sum_k C[i, k] g_k``, starting from ``C = I``. At step
``t`` it meets row ``j = orders[i, t]``: a rule maps the inner product ``<row i so far, g_j>`` to a
coefficient ``c``, and ``C[i, j] += c``. A row meets each row at most once, so ``C[i, j]`` is
written once.

The inner products are entries of ``C G``. Updating ``C G`` after every step costs ``O(m²)`` per
step, ``O(m³)`` memory traffic in all. Instead the steps run in blocks of ``_BLOCK``: ``C G`` is
formed at the start of a block (one matrix product) and, within it, only the inner products each
row still needs in the block are updated (``O(m b)`` per step): ``m / b`` products in all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# A rule maps (inner products [m], step t, carry) to (coefficients [m], new carry, output [m]).
Rule = Callable[[Tensor, int, Tensor], tuple[Tensor, Tensor, Tensor]]

_BLOCK = 128


def _sweep(G: Tensor, orders: Tensor, rule: Rule, carry: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Runs the sweep of ``G`` [m, m] over ``orders`` [m, T] (row ``i`` meets ``orders[i, t]`` at
    step ``t``); returns ``C`` [m, m], the last carry and the rule's outputs stacked to [m, T]."""
    m, steps = orders.shape
    C = torch.eye(m, dtype=G.dtype, device=G.device)
    outputs = []
    for start in range(0, steps, _BLOCK):
        met = orders[:, start : start + _BLOCK]
        inner = (G if start == 0 else C @ G).gather(1, met)  # C = I in the first block
        coefficients = []
        for k in range(met.shape[1]):
            c, carry, output = rule(inner[:, k], start + k, carry)
            inner = inner + c.unsqueeze(1) * G[met[:, k : k + 1], met]  # c g_j, seen by the rest
            coefficients.append(c)
            outputs.append(output)
        C = C.scatter_add(1, met, torch.stack(coefficients, dim=1))
    stacked = torch.stack(outputs, dim=1) if outputs else G.new_zeros(m, 0)
    return C, carry, stacked
