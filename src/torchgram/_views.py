"""Views of parameters: the ops whose outputs hold elements of their input (slices, reshapes,
transposes, no-op casts), and how the tape follows them with an index of leaf elements, so that
a use of a view is a use of those elements of its leaf."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

from torchgram._uses import ParamView, positions

Tensor = torch.Tensor

# Ops whose output elements are each one element of the input (views, copies, rearrangements).
# Applied to an index tensor they tell which leaf elements a view holds.
VIEW_OPS = frozenset(
    {
        "t", "T", "mT", "transpose", "permute", "reshape", "view", "chunk", "split",
        "split_with_sizes", "tensor_split", "unbind", "narrow", "select", "squeeze", "unsqueeze",
        "flatten", "unflatten", "movedim", "moveaxis", "swapaxes", "swapdims", "contiguous",
        "expand", "__getitem__", "repeat", "clone", "view_as", "reshape_as", "expand_as",
    }
)  # fmt: skip
AS_OPS = {"view_as": "view", "reshape_as": "reshape", "expand_as": "expand"}
# Casts of their first argument: to a dtype, device or layout it already has they return the same
# values (the tensor itself, or under a transform a new wrapper), which stay a parameter view.
CASTS = frozenset(
    {
        "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
        "resolve_conj", "resolve_neg", "atleast_1d", "atleast_2d", "atleast_3d",
    }
)  # fmt: skip


def same_value(views: dict[int, ParamView], out: Any, source: Tensor) -> bool:
    """Whether ``out`` is the parameter view ``source`` itself, or the same values as another
    tensor (under a transform a no-op cast may return a new wrapper): then it becomes a view
    of the same elements."""
    if out is source:
        return True
    same = (
        isinstance(out, Tensor)
        and out.shape == source.shape
        and out.dtype == source.dtype
        and out.device == source.device
    )
    if same:
        view = views[id(source)]
        views[id(out)] = ParamView(view.leaf, out, view.index)
    return same


def only_tensor(leaves: list[Any], slots: list[int], name: str) -> bool:
    """Whether a view op's only tensor input is the one parameter view it reads."""
    tensors = [i for i, v in enumerate(leaves) if isinstance(v, Tensor)]
    if name in AS_OPS:
        return len(slots) == 1 and tensors[0] == slots[0]
    return tensors == slots[:1] == slots


def follow_view(
    views: dict[int, ParamView],
    func: Callable[..., Any],
    name: str,
    leaves: list[Any],
    spec: Any,
    slot: int,
) -> Any:
    """Run a view op on a parameter view and record its outputs as views of the same leaf, with
    the op applied to the view's index of leaf elements."""
    source = views[id(leaves[slot])]
    args, kwargs = optree.tree_unflatten(spec, leaves)
    out = func(*args, **kwargs)
    index = positions(source.index, source.tensor.shape)
    index_leaves = list(leaves)
    index_leaves[slot] = index
    if name in AS_OPS:  # the other tensor only gives a shape
        other = next(v for i, v in enumerate(leaves) if isinstance(v, Tensor) and i != slot)
        index_out = getattr(index, AS_OPS[name])(*other.shape)
    else:
        index_args, index_kwargs = optree.tree_unflatten(spec, index_leaves)
        index_out = func(*index_args, **index_kwargs)
    outs = optree.tree_leaves(out)
    index_outs = optree.tree_leaves(index_out)
    for view, view_index in zip(outs, index_outs, strict=True):
        if isinstance(view, Tensor):
            views[id(view)] = ParamView(source.leaf, view, view_index)
    return out
