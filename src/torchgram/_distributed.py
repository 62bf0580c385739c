"""The Gramian of a batch spread over the ranks of a ``torch.distributed`` process group.

Each rank runs fn on its shard (the samples along ``batch_dim``) and holds its factors. The
global Gramian's block between the shards of ranks r and s is the cross-Gramian of their factors
(``torchgram._assemble_cross``). Every rank in turn broadcasts its factors, each in the smaller of
two forms (the factor's own tensors, e.g. activations and cotangents, or its per-sample
gradients), so that a rank holds its own factors and one other rank's at a time; each rank
computes the blocks of its own rows, and the row bands are gathered, so that every rank holds the
same Gramian. A direction ``Σ_r w[r] ∂out[r]/∂params`` is each rank's own rows, summed over the
ranks.

Communication is collective (``broadcast``, ``all_gather``, ``all_reduce``): every rank of the
group must call the same transform with the same fn and parameters. A rank whose fn raises
tells the others first, so that all raise instead of waiting for it.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from torchgram._assemble import gramian_of_factors
from torchgram._assemble_cross import cross_of_factors
from torchgram._factors import Dense, Factor
from torchgram._internals import is_wrapped
from torchgram._linearised import Linearised, Options
from torchgram._pytree import Inputs
from torchgram._shapes import generalize

Tensor = torch.Tensor

_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
]  # fmt: skip


class RankFailed(RuntimeError):
    """Another rank of the group raised while this one did not."""


def check_group(group: Any, batch_dim: int | None, caller: str) -> None:
    """Refuse a group option that cannot mean a batch spread over ranks."""
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"{caller}: group was given but torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group first (e.g. under torchrun), or pass "
            "group=None for one process."
        )
    if batch_dim is None:
        raise ValueError(
            f"{caller}: group spreads the samples along batch_dim over the ranks, but "
            "batch_dim is None. Pass the output dimension that indexes the samples."
        )


def agree(
    error: BaseException | None, run: Linearised | None, group: Any, caller: str
) -> tuple[list[int], list[int], bool]:
    """Tell every rank whether each rank's run succeeded, and check that the ranks used the same
    parameters and output shapes; return the shard sizes, their offsets, and whether the ranks'
    runs made factors of the same structure (see ``_structure``).

    Raises on every rank when one failed (the failing rank re-raises its own error).
    """
    world = dist.get_world_size(group)
    fingerprint = 0 if run is None else _fingerprint(run)
    size = 0 if run is None else run.out.shape[run.batch_dim]  # type: ignore[index]
    structure = 0 if run is None else _structure(run)
    mine = torch.tensor([int(error is not None), fingerprint, size, structure], dtype=torch.int64)
    mine = mine.to(_collective_device(group))
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).cpu().tolist()
    failed = [rank for rank, row in enumerate(table) if row[0]]
    if error is not None:
        raise error
    if failed:
        raise RankFailed(
            f"{caller}: rank {failed[0]} of the group raised in its call (see its own error); "
            "every rank stops so that none waits for it."
        )
    if len({row[1] for row in table}) > 1:
        raise ValueError(
            f"{caller}: the ranks of the group called fn with parameters or outputs of "
            "different shapes (or dtypes). Every rank must hold the same parameters (e.g. "
            "broadcast them from rank 0 at the start) and give outputs that differ only in "
            "the number of samples along batch_dim."
        )
    sizes = [row[2] for row in table]
    offsets = [sum(sizes[:rank]) for rank in range(world)]
    return sizes, offsets, len({row[3] for row in table if row[2]}) <= 1


def _fingerprint(run: Linearised) -> int:
    b = run.batch_dim
    out = [s for d, s in enumerate(run.out.shape) if d != b]
    text = repr(([(tuple(p.shape), str(p.dtype)) for p in run.params], out, b))
    return zlib.crc32(text.encode())


def _structure(run: Linearised) -> int:
    """A fingerprint of the run's factors: leaf, kind and region of each. A receiver takes what
    is not sent (regions, sizes, strides) from its own factors, so every rank's must have the
    same structure; a rank's run may differ from the others' (a shard of one sample runs under
    vmap, larger ones on the whole batch), and then each leaf goes as one ``Dense``."""
    if not run.out.numel():
        return 0
    text = repr(
        [
            (leaf, type(factor).__name__, None if factor.index is None else factor.index.shape)
            for leaf, factor in run.contributions
        ]
    )
    return zlib.crc32(text.encode())


def _per_leaf(run: Linearised) -> list[tuple[int, Factor]]:
    """Each leaf's per-sample gradients as one ``Dense`` factor: the same structure on every
    rank, whatever factors its run made."""
    b = run.batch_dim
    assert b is not None
    B = run.out.shape[b]
    K = run.out.numel() // B
    grads = [p.new_zeros(K, B, p.numel()) for p in run.params]
    for leaf, factor in run.contributions:
        g = factor.materialise(run.chunk_bytes).reshape(K, B, -1)
        if factor.index is None:
            grads[leaf] += g
        else:
            grads[leaf].index_add_(2, factor.index.reshape(-1).to(g.device), g)
    return [(leaf, Dense(None, g)) for leaf, g in enumerate(grads)]


def _collective_device(group: Any) -> torch.device:
    """Where the tensors of a collective must live: the current GPU for NCCL, else the CPU
    (also on a rank that has no tensor of its own to tell by, e.g. after fn raised)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(
    linearise: Callable[[], tuple[Inputs, Linearised]], options: Options
) -> tuple[Inputs, Sharded]:
    """Run ``linearise`` on this rank's shard and agree with the other ranks on the outcome
    (every rank raises if one failed) and on the shard sizes."""
    group, caller = options.group, options.caller
    try:
        inputs, run = linearise()
        refuse_transforms(inputs.params, caller)
        if run.out.numel():
            run.contributions  # noqa: B018 - the factors (a rule may raise), made once here
    except Exception as error:
        agree(error, None, group, caller)
        raise
    sizes, offsets, uniform = agree(None, run, group, caller)
    return inputs, Sharded(run, sizes, offsets, group, uniform)


def refuse_transforms(params: Sequence[Tensor], caller: str) -> None:
    if any(is_wrapped(p) for p in params):
        raise ValueError(
            f"{caller}: group cannot be used inside a torch.func transform (vmap, grad, ...) "
            "of the parameters: the ranks exchange tensors that a transform wraps. Call the "
            "transform on each member outside, or pass group=None."
        )


def global_gramian(run: Linearised, sizes: list[int], group: Any, uniform: bool = True) -> Tensor:
    """The generalized Gramian of the global batch (shards in rank order), on every rank
    (``uniform``: the ranks' factors have the same structure, else each leaf is sent whole)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    b = run.batch_dim
    assert b is not None
    K = torch.Size([s for d, s in enumerate(run.out.shape) if d != b]).numel()
    total = sum(sizes)
    local = (run.contributions if uniform else _per_leaf(run)) if run.out.numel() else []
    blocks = []
    for source in range(world):
        if source == rank:
            blocks.append(_own_block(run) if sizes[rank] else run.out.new_zeros(0, 0))
            _broadcast_factors(local, K * sizes[rank], run.params, source, group)
            continue
        remote = _broadcast_factors(local, K * sizes[source], run.params, source, group)
        rows = (K * sizes[rank], K * sizes[source])
        if not rows[0] or not rows[1]:
            blocks.append(run.out.new_zeros(rows))
            continue
        blocks.append(cross_of_factors(local, remote, run.params, rows, run.chunk_bytes))
    band = torch.cat(
        [block.reshape(K, sizes[rank], K, sizes[s]) for s, block in enumerate(blocks)], dim=3
    )  # [K, B_r, K, B]
    bands = _all_gather_along(band, 1, sizes, group)  # [K, B, K, B]
    shape = list(run.out.shape)
    shape[b] = total
    return generalize(bands.reshape(K * total, K * total), torch.Size(shape), b)


def _own_block(run: Linearised) -> Tensor:
    return gramian_of_factors(run.contributions, run.params, run.out.numel(), run.chunk_bytes)


@dataclasses.dataclass
class Sharded:
    """A run on this rank's shard, seen as the run on the global batch: what the transforms
    read from a ``Linearised`` (``out``, ``aux``, ``statistics``, ``gramian``, ``vjp``)."""

    run: Linearised
    sizes: list[int]
    offsets: list[int]
    group: Any
    uniform: bool = True

    @property
    def aux(self) -> Any:
        return self.run.aux

    @property
    def statistics(self) -> list[tuple[Tensor, Tensor]]:
        return self.run.statistics

    @functools.cached_property
    def out(self) -> Tensor:
        return global_out(self.run, self.sizes, self.group)

    def gramian(self, release: bool = False) -> Tensor:
        return global_gramian(self.run, self.sizes, self.group, self.uniform)

    def vjp(self, weights: Tensor) -> list[Tensor]:
        return global_vjp(self.run, weights, self.offsets, self.group)


def global_out(run: Linearised, sizes: list[int], group: Any) -> Tensor:
    """fn's output on the global batch (the shards joined along batch_dim), on every rank."""
    assert run.batch_dim is not None
    return _all_gather_along(run.out.detach(), run.batch_dim, sizes, group)


def global_vjp(run: Linearised, weights: Tensor, offsets: list[int], group: Any) -> list[Tensor]:
    """``Σ_r w[r] ∂out[r]/∂params`` over the global batch, the same on every rank: this rank's
    rows of ``weights``, pulled back, summed over the ranks."""
    b = run.batch_dim
    assert b is not None
    rank = dist.get_rank(group)
    mine = weights.narrow(b, offsets[rank], run.out.shape[b])
    grads = run.vjp(mine)
    flat = torch.cat([g.reshape(-1) for g in grads]) if grads else weights.new_zeros(0)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    parts = flat.split([g.numel() for g in grads])
    return [part.view_as(g) for part, g in zip(parts, grads, strict=True)]


def _all_gather_along(x: Tensor, dim: int, sizes: list[int], group: Any) -> Tensor:
    """Join every rank's ``x`` along ``dim`` (its size there differing by rank) in rank order."""
    most = max(sizes)
    pad = list(x.shape)
    pad[dim] = most - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim).contiguous()
    everyone = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(everyone, padded, group=group)
    return torch.cat([t.narrow(dim, 0, n) for t, n in zip(everyone, sizes, strict=True)], dim=dim)


# --- factors on the wire ------------------------------------------------------------------------


def _wire_form(factor: Factor, rows: int, leaf: Tensor) -> tuple[bool, list[Tensor]]:
    """The smaller of the factor's own tensors (activations and cotangents: the ghost form's
    inputs) and its per-sample gradients, as ``(dense, tensors)``. The factor's other fields
    (its region, sizes, strides) are the same on every rank, so the receiver takes them from
    its own factor."""
    own = [getattr(factor, f.name) for f in _tensor_fields(factor)]
    if isinstance(factor, Dense):
        return True, own
    region = leaf.numel() if factor.index is None else factor.index.numel()
    if rows * region < sum(t.numel() for t in own):
        return True, [factor.materialise()]
    return False, own


def _tensor_fields(factor: Factor) -> list[dataclasses.Field[Any]]:
    return [
        f
        for f in dataclasses.fields(factor)  # type: ignore[arg-type]
        if f.name != "index" and isinstance(getattr(factor, f.name), Tensor)
    ]


def _broadcast_factors(
    local: Sequence[tuple[int, Factor]],
    rows: int,
    params: Sequence[Tensor],
    source: int,
    group: Any,
) -> list[tuple[int, Factor]]:
    """Rank ``source``'s factors on every rank (``local`` is this rank's, the template; ``rows``
    its rows, ``K * B``)."""
    rank = dist.get_rank(group)
    device = _collective_device(group)
    if rank == source:
        forms = [_wire_form(factor, rows, params[leaf]) for leaf, factor in local]
        header = _header(forms)
    else:
        forms = []
        header = []
    count = torch.tensor([len(header)], dtype=torch.int64, device=device)
    dist.broadcast(count, source, group=group)
    meta = torch.tensor(header, dtype=torch.int64, device=device)
    if rank != source:
        meta = torch.empty(int(count.item()), dtype=torch.int64, device=device)
    dist.broadcast(meta, source, group=group)
    specs = _read_header(meta.cpu().tolist())
    buffers = _buffers(forms, specs, device) if rank == source else _empty_buffers(specs, device)
    for buffer in buffers.values():
        dist.broadcast(buffer, source, group=group)
    if rank == source:
        return list(local)
    return _unpack(local, specs, buffers)


def _header(forms: list[tuple[bool, list[Tensor]]]) -> list[int]:
    """``[dense, n_tensors, (dtype, ndim, *shape) per tensor]`` per factor, flattened."""
    header: list[int] = []
    for dense, tensors in forms:
        header += [int(dense), len(tensors)]
        for t in tensors:
            header += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    return header


def _read_header(values: list[int]) -> list[tuple[bool, list[tuple[torch.dtype, list[int]]]]]:
    specs = []
    i = 0
    while i < len(values):
        dense, n = bool(values[i]), values[i + 1]
        i += 2
        tensors = []
        for _ in range(n):
            dtype, ndim = _DTYPES[values[i]], values[i + 1]
            tensors.append((dtype, values[i + 2 : i + 2 + ndim]))
            i += 2 + ndim
        specs.append((dense, tensors))
    return specs


def _buffers(
    forms: list[tuple[bool, list[Tensor]]], specs: Any, device: torch.device
) -> dict[torch.dtype, Tensor]:
    """One flat buffer per dtype, the tensors in order."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for _, tensors in forms:
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    empty = _empty_buffers(specs, device)
    return {
        dtype: torch.cat(by_dtype[dtype]) if by_dtype.get(dtype) else empty[dtype]
        for dtype in empty
    }


def _empty_buffers(specs: Any, device: torch.device) -> dict[torch.dtype, Tensor]:
    totals: dict[torch.dtype, int] = {}
    for _, tensors in specs:
        for dtype, shape in tensors:
            totals[dtype] = totals.get(dtype, 0) + int(torch.Size(shape).numel())
    order = sorted(totals, key=_DTYPES.index)  # every rank walks the buffers in one order
    return {dtype: torch.empty(totals[dtype], dtype=dtype, device=device) for dtype in order}


def _unpack(
    local: Sequence[tuple[int, Factor]], specs: Any, buffers: dict[torch.dtype, Tensor]
) -> list[tuple[int, Factor]]:
    starts = dict.fromkeys(buffers, 0)
    out: list[tuple[int, Factor]] = []
    for (leaf, template), (dense, tensors) in zip(local, specs, strict=True):
        fields = _tensor_fields(template)
        device = getattr(template, fields[0].name).device if fields else None
        values = []
        for dtype, shape in tensors:
            n = int(torch.Size(shape).numel())
            value = buffers[dtype][starts[dtype] : starts[dtype] + n].view(shape)
            values.append(value if device is None else value.to(device))
            starts[dtype] += n
        if dense:
            out.append((leaf, Dense(template.index, values[0])))
        else:
            named = {f.name: v for f, v in zip(fields, values, strict=True)}
            out.append((leaf, dataclasses.replace(template, **named)))  # type: ignore[type-var]
    return out
