"""The tape: views of parameters, composite functions, randomness, and nothing left behind."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import _get_current_function_mode_stack

from torchgram._tape import Tape
from torchgram._uses import ParamView, may_mention


def _record(fn, params, *args):
    tape = Tape(params, None, "test", per_sample=False)
    with tape:
        fn(*args)
    assert not _get_current_function_mode_stack()
    return tape


def test_views_carry_the_positions_of_their_elements() -> None:
    w = torch.randn(6, 4)
    x = torch.randn(5, 2)
    tape = _record(lambda: torch.nn.functional.linear(x, w.chunk(3)[1].T[1:, :]), [w])
    (use,) = tape.uses
    (view,) = (leaf for leaf in use.leaves if isinstance(leaf, ParamView))
    expected = torch.arange(24).view(6, 4).chunk(3)[1].T[1:, :]
    assert torch.equal(view.index, expected)
    assert torch.equal(w.reshape(-1)[view.index], view.tensor)


def test_composite_functions_are_recorded_as_their_primitive_ops() -> None:
    attention = nn.MultiheadAttention(6, 2, batch_first=True, kdim=4, vdim=5)
    params = dict(attention.named_parameters())
    q, k, v = torch.randn(1, 3, 6), torch.randn(1, 2, 4), torch.randn(1, 2, 5)
    tape = _record(
        lambda: functional_call(attention, params, (q, k, v), {"need_weights": False}),
        list(params.values()),
    )
    assert [use.name for use in tape.uses] == ["linear"] * 4


def test_recurrent_layers_become_linear_uses() -> None:
    gru = nn.GRU(3, 4, batch_first=True)
    params = dict(gru.named_parameters())
    x = torch.randn(1, 5, 3)
    expected = gru(x)[0]
    tape = Tape(list(params.values()), None, "test", per_sample=False)
    with tape:
        out = functional_call(gru, params, (x,))[0]
    assert torch.allclose(out, expected, atol=1e-6)
    assert {use.name for use in tape.uses} == {"linear"}
    assert len(tape.uses) == 1 + 5  # input projection once, recurrent projection per step


def test_randomness_is_noticed() -> None:
    w = torch.randn(3, 3)
    x = torch.randn(2, 3)
    tape = _record(lambda: torch.nn.functional.dropout(x @ w, 0.5, training=True), [w])
    assert tape.random
    tape = _record(lambda: torch.nn.functional.dropout(x @ w, 0.0, training=True), [w])
    assert not tape.random


def test_ops_without_differentiable_output_are_not_uses() -> None:
    w = torch.randn(3, 3)
    tape = _record(lambda: (w.shape, w.size(0), torch.isfinite(w), w > 0), [w])
    assert tape.uses == []


def test_parameters_inside_list_tuple_and_keyword_arguments_are_uses() -> None:
    """Ops without a parameter return before any flattening (a list of tensors, a tuple of
    slices); a parameter in a list, a tuple or a keyword argument is still found."""
    w, x = torch.randn(2, 3), torch.randn(2, 3)
    tape = _record(
        lambda: (
            torch.cat([x, x[:, :2]], -1),  # no parameter: no use
            torch.cat([x, w]),  # in a list
            torch.cat((w,)),  # in a tuple
            torch.stack([x, w.view(2, 3)]),  # a view, in a list
            torch.einsum("ij,ij->i", x, w),
            torch.cat(tensors=[x, w]),  # in a keyword argument
        ),
        [w],
    )
    assert [use.name for use in tape.uses] == ["cat", "cat", "stack", "einsum", "cat"]


def test_may_mention_sees_a_parameter_in_a_dict() -> None:
    w, x = torch.randn(2, 3), torch.randn(2, 3)
    ids = {id(w)}
    assert may_mention(([{"a": w}],), {}, ids)  # nested deeper than one level: flattened
    assert may_mention(({"a": x},), {}, ids)  # a dict is always flattened to see
    assert may_mention((x,), {"weight": w}, ids)
    assert not may_mention(([x, x], (slice(None), 0, None, ...)), {"dim": 1}, ids)
