"""torch's private API as torchgram uses it (torchgram._internals), where a torch upgrade would
break it first."""

from __future__ import annotations

import torch

from torchgram._internals import beneath_transforms, edge, in_custom_function, readable


def test_gradient_edge_of_a_custom_function_output_keeps_its_graph() -> None:
    """A custom Function's node is owned by the C++ graph: its edge carries an ownership token
    (``get_gradient_edge``'s), so the pull-back works after the output itself is gone."""

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    x = torch.randn(3, requires_grad=True)
    out = Double.apply(x)
    custom = edge(out, out.grad_fn)
    assert custom.ownership_token is not None
    plain = x * 3
    assert edge(plain, plain.grad_fn).node is plain.grad_fn
    del out
    (g,) = torch.autograd.grad(custom, x, torch.ones(3))
    assert torch.equal(g, torch.full((3,), 2.0))


def test_beneath_an_outer_vmap_every_member_is_seen() -> None:
    x = torch.arange(6.0).view(3, 2)
    totals: list[float] = []
    readables: list[bool] = []

    def member(row: torch.Tensor) -> torch.Tensor:
        totals.append(float(beneath_transforms(row * 2).sum()))  # all members' values at once
        readables.append(readable(row))
        return row

    torch.func.vmap(member)(x)
    assert totals == [30.0] and readables == [False] and readable(x)


def test_custom_function_forward_is_recognised() -> None:
    seen: list[bool] = []

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(in_custom_function())
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    Identity.apply(torch.ones(2, requires_grad=True))
    assert seen == [True] and not in_custom_function()
