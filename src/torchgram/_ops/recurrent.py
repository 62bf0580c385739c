"""Recurrent layers (``_VF.gru``, ``_VF.lstm``, ``_VF.rnn_tanh``, ``_VF.rnn_relu``) in plain ops.

The fused recurrent kernels have no ``vmap`` batching rule, and one fused op would leave only the
slow generic rule. Written as ``linear`` calls and elementwise gates, with the same semantics as
``torch.nn.GRU``/``LSTM``/``RNN``, every weight use is a linear map: the input projection over all
time steps at once, the recurrent projection once per step (the uses of one weight are then joined
into one factor with T tokens, so cross terms between steps are exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

RNN_OPS = frozenset({"gru", "lstm", "rnn_tanh", "rnn_relu"})


def run_recurrent(name: str, args: Sequence[Any], caller: str) -> tuple[Tensor, ...]:
    """Evaluate a ``_VF`` recurrent op from its positional arguments."""
    if len(args) != 9 or (isinstance(args[1], Tensor) and not args[1].is_floating_point()):
        raise NotImplementedError(
            f"{caller}: packed sequences (torch.nn.utils.rnn.PackedSequence) in recurrent layers "
            "are not supported. Pad the sequences instead (and mask the losses)."
        )
    x, hx, weights, bias, layers, dropout, train, bidirectional, batch_first = args
    if batch_first:
        x = x.transpose(0, 1)
    directions = 2 if bidirectional else 1
    per_cell = len(weights) // (layers * directions)
    cells = [weights[i * per_cell : (i + 1) * per_cell] for i in range(layers * directions)]
    if name == "lstm":
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    finals_h: list[Tensor] = []
    finals_c: list[Any] = []
    for layer in range(layers):
        outputs = []
        for direction in range(directions):
            cell = layer * directions + direction
            state = (h0[cell], None if c0 is None else c0[cell])
            sequence = x.flip(0) if direction else x
            out, h, c = _layer(name, sequence, state, cells[cell], bool(bias))
            outputs.append(out.flip(0) if direction else out)
            finals_h.append(h)
            finals_c.append(c)
        x = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
        if dropout and train and layer < layers - 1:
            x = F.dropout(x, dropout, training=True)
    output = x.transpose(0, 1) if batch_first else x
    if name == "lstm":
        return output, torch.stack(finals_h), torch.stack(finals_c)
    return output, torch.stack(finals_h)


def _layer(
    name: str,
    sequence: Tensor,
    state: tuple[Tensor, Tensor | None],
    weights: Sequence[Tensor],
    bias: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if bias else (None, None)
    projection = weights[4 if bias else 2] if len(weights) > (4 if bias else 2) else None
    h, c = state
    # all time steps at once, then split once: a select per step would zero-fill the whole
    # [T, B, 4H] gradient in its backward, every step (66 ms a call on a 2-layer LSTM LM)
    inputs = F.linear(sequence, w_ih, b_ih).unbind(0)
    outputs = []
    for step in range(sequence.shape[0]):
        hidden = F.linear(h, w_hh, b_hh)
        if name == "gru":
            i_r, i_z, i_n = inputs[step].chunk(3, dim=-1)
            h_r, h_z, h_n = hidden.chunk(3, dim=-1)
            reset = torch.sigmoid(i_r + h_r)
            update = torch.sigmoid(i_z + h_z)
            candidate = torch.tanh(i_n + reset * h_n)
            h = (1 - update) * candidate + update * h
        elif name == "lstm":
            assert c is not None
            i, f, g, o = (inputs[step] + hidden).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if projection is not None:
                h = F.linear(h, projection)
        else:
            pre = inputs[step] + hidden
            h = torch.tanh(pre) if name == "rnn_tanh" else torch.relu(pre)
        outputs.append(h)
    return torch.stack(outputs), h, c
