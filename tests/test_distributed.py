"""Gramians of a batch spread over processes (``group=``), with gloo on the CPU: each rank's
results equal the single-process results on the concatenated batch (float64), and are the same
on every rank."""

from __future__ import annotations

import functools
import gc
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from zoo import cases

import torchgram

MODELS = ("mlp", "cnn", "transformer", "conv1d_embedding")  # the last sends integer tokens


def _global_batch(name: str, total: int) -> tuple[torch.Tensor, ...]:
    """``total`` samples for a zoo model, the same in every process."""
    case = cases()[name]
    generator = torch.Generator().manual_seed(1)
    out = []
    for a in case.args:
        if not a.is_floating_point():  # tokens
            out.append(
                torch.randint(0, int(a.max()) + 1, (total, *a.shape[1:]), generator=generator)
            )
            continue
        copies = math.ceil(total / a.shape[0])
        noise = torch.randn(copies * a.shape[0], *a.shape[1:], generator=generator, dtype=a.dtype)
        out.append((a.repeat(copies, *[1] * (a.dim() - 1)) + 0.3 * noise)[:total])
    return tuple(out)


def _weights(total: int) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, total, dtype=torch.float64)


def _init(rank: int, world: int, address: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)


def _finish() -> None:
    """Leave the group as docs/scaling.md advises: collect garbage first, so that no tensor or
    process group of a collective is freed during interpreter shutdown (torch 2.13's gloo then
    aborts the process now and then), and leave together."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _results_worker(rank: int, world: int, address: str, out_dir: str, sizes: list[int]):
    _init(rank, world, address)
    offset, size = sum(sizes[:rank]), sizes[rank]
    results = {}
    group = dist.group.WORLD
    for name in MODELS:
        case = cases()[name]
        shard = tuple(a[offset : offset + size] for a in _global_batch(name, sum(sizes)))
        G = torchgram.gramian(case.fn, case.params, *shard, batch_dim=0, group=group)
        out, vjp_fn, G_vjp = torchgram.vjp_and_gramian(
            case.fn, case.params, *shard, batch_dim=0, group=group
        )
        step = torchgram.jd_grad(case.fn, torchgram.weightings.upgrad, batch_dim=0, group=group)
        results[name] = {
            "G": G,
            "G_vjp": G_vjp,
            "out": out,
            "direction": vjp_fn(_weights(sum(sizes))),
            "jd": step(case.params, *shard),
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    if world == 2:  # the refusals, in the same processes (each start of processes costs seconds)
        Path(out_dir, f"errors{rank}.txt").write_text("\n".join(_errors(rank)))
    _finish()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, world: int, tmp_path: Path, *args) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(
        worker, args=(world, address, str(tmp_path), *args), nprocs=world, join=True,
        start_method="spawn",
    )  # fmt: skip


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = b.abs().max().clamp(min=1e-30)
    return a.shape == b.shape and float((a - b).abs().max() / scale) < 1e-10


@pytest.mark.parametrize("sizes", [[2, 3], [1, 3, 2]], ids=["2 ranks", "3 ranks"])
def test_global_gramian_and_direction_match_one_process(two_ranks, tmp_path, sizes) -> None:
    if len(sizes) == 2:
        path = two_ranks
    else:
        _spawn(_results_worker, len(sizes), tmp_path, sizes)
        path = tmp_path
    ranks = [torch.load(path / f"rank{r}.pt") for r in range(len(sizes))]
    total = sum(sizes)
    for name in MODELS:
        case = cases()[name]
        batch = _global_batch(name, total)
        G = torchgram.gramian(case.fn, case.params, *batch, batch_dim=0)
        out, vjp_fn, _ = torchgram.vjp_and_gramian(case.fn, case.params, *batch, batch_dim=0)
        direction = vjp_fn(_weights(total))
        jd = torchgram.jd_grad(case.fn, torchgram.weightings.upgrad, batch_dim=0)(
            case.params, *batch
        )
        for result in ranks:
            mine = result[name]
            assert _close(mine["G"], G) and _close(mine["G_vjp"], G)
            assert _close(mine["out"], out)
            for key in direction:
                assert _close(mine["direction"][key], direction[key]), (name, key)
                assert _close(mine["jd"][key], jd[key]), (name, key)
        first = ranks[0][name]
        for result in ranks[1:]:  # the same bits on every rank
            assert torch.equal(result[name]["G"], first["G"])
            for key in direction:
                assert torch.equal(result[name]["jd"][key], first["jd"][key])


def _errors(rank: int) -> list[str]:
    """What each of three refused calls raised on this rank."""
    case = cases()["mlp"]
    group = dist.group.WORLD
    x = _global_batch("mlp", 4)[0][2 * rank : 2 * rank + 2]
    messages = []

    def failing(params, x):
        if rank == 1:
            raise RuntimeError("rank 1's own error")
        return case.fn(params, x)

    wrong = {
        k: v[..., :1] if rank == 1 and k.endswith("bias") else v for k, v in case.params.items()
    }
    stacked = {k: torch.stack([v, 2 * v]) for k, v in case.params.items()}

    def ensemble(group, batch_dim):
        return torch.func.vmap(
            lambda p: torchgram.gramian(case.fn, p, x, batch_dim=batch_dim, group=group)
        )(stacked)

    calls = [
        functools.partial(torchgram.gramian, failing, case.params, x),
        functools.partial(torchgram.gramian, case.fn, wrong, x),
        functools.partial(torchgram.gramian, case.fn, case.params, x, batch_dim=None),
        ensemble,
    ]
    for call in calls:
        try:
            options = {} if getattr(call, "keywords", None) else {"batch_dim": 0}
            call(group=group, **options)
            messages.append("no error")
        except Exception as error:  # every rank must raise, none may hang
            messages.append(f"{type(error).__name__}: {error}")
    return messages


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The results of two ranks with shards of 2 and 3 samples, and their refusals."""
    path = tmp_path_factory.mktemp("two_ranks")
    _spawn(_results_worker, 2, path, [2, 3])
    return path


def test_errors_reach_every_rank(two_ranks) -> None:
    ranks = [Path(two_ranks, f"errors{r}.txt").read_text().splitlines() for r in range(2)]
    assert ranks[1][0] == "RuntimeError: rank 1's own error"
    assert ranks[0][0].startswith("RankFailed: gramian(fn, batch_dim=0): rank 1 of the group")
    assert len(ranks[0]) == len(ranks[1]) == 4
    for rank in ranks:
        assert "ran" in rank[1] and "different shapes" in rank[1], rank[1]
        assert rank[2].startswith("ValueError: gramian(fn, batch_dim=None): group spreads")
        assert rank[3].startswith("ValueError: gramian(fn, batch_dim=0): group cannot be used")


def test_group_needs_an_initialised_process_group() -> None:
    case = cases()["mlp"]
    with pytest.raises(ValueError, match=r"gramian\(fn, batch_dim=0\): group was given but"):
        torchgram.gramian(case.fn, case.params, *case.args, batch_dim=0, group=object())
