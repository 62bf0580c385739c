"""Pytree handling at the boundary: flatten ``params`` and the data arguments once, check them.

Inside, everything works on flat tuples: the parameter leaves, and the tensor leaves of the other
positional arguments with the dimension (or None) where each holds its samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch

from torchgram._uses import differentiable

Tensor = torch.Tensor
InDims = int | None | Sequence[Any]


def normalize_argnums(argnums: int | tuple[int, ...], caller: str) -> tuple[int, ...]:
    """``argnums`` as a tuple of non-negative ints (negative ones are resolved later)."""
    numbers = (argnums,) if isinstance(argnums, int) else argnums
    if (
        not isinstance(numbers, tuple)
        or not numbers
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
    ):
        raise TypeError(
            f"{caller}: argnums must be an int or a non-empty tuple of ints (the positions of the "
            f"parameter arguments), got {argnums!r}."
        )
    return numbers


@dataclass(frozen=True)
class Inputs:
    """The positional arguments of one call, split into parameters and data.

    Attributes:
        args: All positional arguments.
        argnums: Positions of the parameter arguments (non-negative).
        params: Flattened parameter leaves.
        data: Flattened leaves of the other arguments, in order.
        dims: For each data leaf, the dimension of its samples, or None.
    """

    args: tuple[Any, ...]
    argnums: tuple[int, ...]
    params: tuple[Tensor, ...]
    params_spec: Any
    data: tuple[Any, ...]
    data_spec: Any
    dims: tuple[int | None, ...]

    def call(
        self, fn: Callable[..., Any], data: Sequence[Any], params: Sequence[Tensor] | None = None
    ) -> Any:
        """``fn`` on the given data leaves and the original parameters (or ``params``, leaves in
        the same structure)."""
        others = iter(optree.tree_unflatten(self.data_spec, list(data)))
        given = self._params_arguments(params)
        args = [
            given.get(position, self.args[position]) if position in self.argnums else next(others)
            for position in range(len(self.args))
        ]
        return fn(*args)

    def _params_arguments(self, leaves: Sequence[Tensor] | None) -> dict[int, Any]:
        """The positional arguments that hold ``leaves``, by position (none for None)."""
        if leaves is None:
            return {}
        tree = self.unflatten_params(leaves)
        parts = (tree,) if len(self.argnums) == 1 else tuple(tree)
        return dict(zip(self.argnums, parts, strict=True))

    def unflatten_params(self, leaves: Sequence[Tensor]) -> Any:
        """A pytree shaped like the parameters (a tuple of them when argnums is a tuple)."""
        return optree.tree_unflatten(self.params_spec, list(leaves))

    def first(self, n: int) -> list[Any]:
        """The data leaves with only their first ``n`` samples."""
        return self._narrowed(0, n)

    def sample(self, i: int) -> Inputs:
        """These inputs with only sample ``i`` (a batch of one) in every batched argument."""
        return dataclasses.replace(self, data=tuple(self._narrowed(i, 1)))

    def _narrowed(self, start: int, length: int) -> list[Any]:
        return [
            x if d is None else x.narrow(d, start, length)
            for x, d in zip(self.data, self.dims, strict=True)
        ]

    def batched(self) -> list[int]:
        """Positions of the data leaves that hold samples."""
        return [i for i, dim in enumerate(self.dims) if dim is not None]


def split_inputs(
    args: tuple[Any, ...], argnums: tuple[int, ...], in_dims: InDims, caller: str
) -> Inputs:
    """Split ``args`` into parameters and data, and give each data leaf its sample dimension."""
    count = len(args)
    resolved = []
    for n in argnums:
        if not -count <= n < count:
            raise ValueError(
                f"{caller}: argnums={n} but fn was called with {count} positional argument(s). "
                "Pass the parameters as a positional argument at that position."
            )
        resolved.append(n % count)
    argnums = tuple(resolved)
    params_tree = args[argnums[0]] if len(argnums) == 1 else tuple(args[n] for n in argnums)
    params, params_spec = _flatten_params(params_tree, caller)
    entries = _in_dims_entries(in_dims, count, caller)
    others = tuple(args[i] for i in range(count) if i not in argnums)
    data, data_spec = optree.tree_flatten(others, none_is_leaf=True)  # type: ignore[arg-type,var-annotated]
    if not torch.is_inference_mode_enabled():  # autograd cannot save inference tensors
        data = [x.clone() if isinstance(x, Tensor) and x.is_inference() else x for x in data]
    dims: list[int | None] = []
    for position, (arg, entry) in enumerate(
        (args[i], entries[i]) for i in range(count) if i not in argnums
    ):
        dims.extend(_leaf_dims(arg, entry, position, caller))
    return Inputs(args, argnums, params, params_spec, tuple(data), data_spec, tuple(dims))


def _flatten_params(tree: Any, caller: str) -> tuple[tuple[Tensor, ...], Any]:
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=True)
    if not leaves:
        raise ValueError(
            f"{caller}: params has no leaves, so there is nothing to differentiate. Pass the "
            "parameters as a pytree of tensors, e.g. dict(model.named_parameters())."
        )
    if all(differentiable(leaf) and not leaf.is_complex() for leaf in leaves):
        if len({id(leaf) for leaf in leaves}) == len(leaves):
            return tuple(leaves), spec
        raise ValueError(_repeated(tree, leaves, caller))
    for path, leaf in zip(optree.tree_paths(tree, none_is_leaf=True), leaves, strict=True):
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{caller}: every leaf of params must be a tensor, but the leaf at {path} is a "
                f"{type(leaf).__name__}. Pass constants through the other arguments or a closure."
            )
        if leaf.is_complex():
            raise TypeError(
                f"{caller}: the leaf of params at {path} is complex ({leaf.dtype}). torchgram "
                "computes J Jᵀ of real Jacobians. Pass its real and imaginary parts as real "
                "parameters (torch.view_as_real(p)) and rebuild it in fn (torch.view_as_complex)."
            )
        if not differentiable(leaf):
            raise TypeError(
                f"{caller}: the leaf of params at {path} has dtype {leaf.dtype}; only "
                "floating-point tensors have gradients. Leave integer tensors out of params."
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _repeated(tree: Any, leaves: list[Any], caller: str) -> str:
    """The error for one tensor at two places in params (its uses cannot be told apart)."""
    paths = optree.tree_paths(tree, none_is_leaf=True)
    first: dict[int, Any] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        if id(leaf) in first:
            break
        first[id(leaf)] = path
    return (
        f"{caller}: params holds the same tensor at {first[id(leaf)]} and at {path}. A use of "
        "it cannot be told to belong to one place or the other, so the Gramian would be "
        "ambiguous. Pass each parameter once (dict(model.named_parameters()) does), or a clone "
        "for a second, independent parameter."
    )


def _in_dims_entries(in_dims: InDims, count: int, caller: str) -> list[Any]:
    if isinstance(in_dims, bool):
        raise TypeError(
            f"{caller}: in_dims must be an int, None, or a tuple with one entry per positional "
            f"argument of fn, got {in_dims!r}. Give the dimension of the samples (e.g. 0)."
        )
    if in_dims is None or isinstance(in_dims, int):
        return [in_dims] * count
    if not isinstance(in_dims, (tuple, list)):
        raise TypeError(
            f"{caller}: in_dims must be an int, None, or a tuple with one entry per positional "
            f"argument of fn, got {type(in_dims).__name__}."
        )
    if len(in_dims) != count:
        raise ValueError(
            f"{caller}: in_dims has {len(in_dims)} entries but fn was called with {count} "
            "positional arguments. Give one entry per argument (the entry of the parameters is "
            "ignored), or a single int for all."
        )
    return list(in_dims)


def _leaf_dims(arg: Any, entry: Any, position: int, caller: str) -> list[int | None]:
    leaves = optree.tree_leaves(arg, none_is_leaf=True)
    if entry is None or isinstance(entry, int):
        entries: list[Any] = [entry] * len(leaves)
    else:
        try:
            prefix = optree.tree_broadcast_prefix(entry, arg, none_is_leaf=True)
            entries = optree.tree_leaves(prefix, none_is_leaf=True)
        except ValueError as error:
            raise ValueError(
                f"{caller}: the in_dims entry of data argument {position} does not match its "
                f"structure ({error}). Give an int, None, or a pytree prefix of the argument."
            ) from None
    dims: list[int | None] = []
    for leaf, dim in zip(leaves, entries, strict=True):
        if isinstance(dim, bool) or not (dim is None or isinstance(dim, int)):
            raise TypeError(
                f"{caller}: the in_dims entry of data argument {position} holds {dim!r}; each "
                "entry must be an int (the dimension of the samples) or None (no samples)."
            )
        if not isinstance(leaf, Tensor) or dim is None:
            dims.append(None)
            continue
        if not -leaf.dim() <= dim < leaf.dim():
            raise ValueError(
                f"{caller}: in_dims puts the samples of data argument {position} at dim {dim}, "
                f"but that tensor has shape {list(leaf.shape)}. Use a dimension in "
                f"[{-leaf.dim()}, {leaf.dim() - 1}], or None for an argument without samples."
            )
        dims.append(dim % leaf.dim())
    return dims
