"""Measures data-parallel Jacobian descent (``group=``): bytes on the wire and time per step.

Run ``python benchmarks/bench_distributed.py`` (the MLP, the CNN, the GPT-style LM and
ResNet-18 with GroupNorm of ``models.py``), ``--models NAME ...`` for some, ``--batch N`` for
another global batch (the setting's own by default; repeated or cut to N samples), ``--quick``
for a smoke run (MLP and CNN unless ``--models`` says otherwise, 16 samples, one repeat).

For each model, two processes are spawned (``torch.multiprocessing``, ``start_method="spawn"``,
gloo through a ``file://`` init method, one thread each); rank ``r`` holds the ``r``-th half of
the global batch. The step is ``torchgram.jd_grad(fn, torchgram.weightings.upgrad,
batch_dim=0, group=dist.group.WORLD)`` built once, called on ``(params, *shard)``: every rank
broadcasts its factors, computes its band of cross-Gramians, the bands are all-gathered, UPGrad
weights the global Gramian and the direction is all-reduced.

1. Bytes: ``torch.distributed.broadcast``, ``all_gather`` and ``all_reduce`` are wrapped in the
   workers and count what a rank contributes in one step after the warm-up: a broadcast's tensor
   when ``src`` is this rank, an all-gather's input, an all-reduce's tensor. Broadcasts carry the
   factors (and their small headers), all-gathers the shard sizes, the losses and the Gramian
   bands, the all-reduce the direction. The baseline all-gathers per-sample gradients instead:
   ``B_local * P * element_size`` per rank (``K = 1`` loss per sample).
2. Time per step: the two-process step (each call after a barrier; the slower rank's time)
   against the single-process step on the whole batch (``group=None``, run by rank 0 while rank
   1 waits in a barrier) with 1 and with 2 threads, all in the same processes. Repeats
   (``--repeats``) alternate the three and rotate their order (repeat r starts with the r-th);
   within a repeat each is called once untimed, then timed over as many calls as fit in 0.2 s
   (at least one), and the repeat keeps their median. Times are medians over the repeats, ratios
   the medians of the per-repeat ratios (above 1: the two processes are faster). The time the
   two-process step spends inside the collectives (sending, and waiting for the other rank) is
   reported beside it.
3. Check: the two-process Gramian (``torchgram.gramian(..., group=...)``) against the
   single-process Gramian of the whole batch, and the same for the direction: the largest
   difference relative to the largest entry, float32.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_gramian import _functional, _positive
from models import ARCHITECTURES, missing

import torchgram

Tensor = torch.Tensor
Seconds = tuple[float, float]  # wall, CPU
MODELS = ("mlp", "cnn", "transformer-lm", "resnet18-gn")
WORLD = 2
PHASES = ("2 processes", "1 process, 1 thread", "1 process, 2 threads")
BUDGET = 0.2  # seconds of timed calls per phase and repeat


class Traffic:
    """What one rank contributes to the collectives while ``active``: bytes per collective,
    bytes per way a factor travelled, seconds inside the collectives."""

    def __init__(self) -> None:
        self.active = False
        self.reset()

    def reset(self) -> None:
        self.bytes = {"broadcast": 0, "all_gather": 0, "all_reduce": 0}
        self.seconds = 0.0

    @contextmanager
    def recording(self) -> Iterator[Traffic]:
        self.reset()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def install(self) -> None:
        """Wrap the collectives torchgram calls (``dist.broadcast`` etc., looked up at each
        call)."""
        dist.broadcast = self._wrap(dist.broadcast, "broadcast", _broadcast_payload)
        dist.all_gather = self._wrap(dist.all_gather, "all_gather", _tensor(1))
        dist.all_reduce = self._wrap(dist.all_reduce, "all_reduce", _tensor(0))

    def _wrap(
        self, collective: Callable[..., Any], name: str, payload: Callable[..., Tensor | None]
    ) -> Callable[..., Any]:
        @functools.wraps(collective)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return collective(*args, **kwargs)
            sent = payload(args, kwargs)
            self.bytes[name] += 0 if sent is None else _nbytes(sent)
            start = time.perf_counter()
            result = collective(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return result

        return counted


def _tensor(position: int) -> Callable[[tuple[Any, ...], dict[str, Any]], Tensor]:
    """The collective's argument ``tensor``, at ``position`` or by keyword."""
    return lambda args, kwargs: args[position] if len(args) > position else kwargs["tensor"]


def _broadcast_payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    src = args[1] if len(args) > 1 else kwargs.get("src")
    return _tensor(0)(args, kwargs) if src == dist.get_rank() else None


def _seconds(run: Callable[[], Any]) -> Seconds:
    """Wall and CPU (this process's threads, gloo's included) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _batch(inputs: tuple[Tensor, ...], size: int) -> tuple[Tensor, ...]:
    """The inputs with ``size`` samples: repeated, then cut."""
    out = []
    for t in inputs:
        copies = -(-size // t.shape[0])
        out.append(t.repeat(copies, *[1] * (t.dim() - 1))[:size].contiguous())
    return tuple(out)


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _flat(tree: Any) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def _worker(rank: int, model: str, batch: int, repeats: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        result = _measure(rank, model, batch, repeats)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        gc.collect()  # as docs/scaling.md advises: nothing of a collective freed at shutdown
        dist.destroy_process_group()


def _measure(rank: int, model: str, batch: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    setting = ARCHITECTURES[model]()
    fn, params = _functional(setting.model, setting)
    inputs = _batch(setting.inputs, batch)
    for t in (*params.values(), *inputs):  # the same model and batch on both ranks, for sure
        dist.broadcast(t, 0)
    local = batch // WORLD
    shard = tuple(t[rank * local : (rank + 1) * local] for t in inputs)
    group = dist.group.WORLD
    upgrad = torchgram.weightings.upgrad
    together = torchgram.jd_grad(fn, upgrad, batch_dim=0, group=group)
    alone = torchgram.jd_grad(fn, upgrad, batch_dim=0)

    def two() -> Any:
        return together(params, *shard)

    def one() -> Any:
        return alone(params, *inputs)

    def solo(run: Callable[[], Any], threads: int) -> Callable[[int], list[Seconds]]:
        """``run`` on rank 0 with ``threads`` threads, rank 1 waiting (idle: gloo's barrier
        sleeps); wall and CPU seconds per call."""

        def timed(calls: int) -> list[Seconds]:
            times = []
            if rank == 0:
                torch.set_num_threads(threads)
                run()  # after itself, as in training
                times = [_seconds(run) for _ in range(calls)]
                torch.set_num_threads(1)
            dist.barrier()
            return times

        return timed

    traffic = Traffic()
    traffic.install()
    in_collectives: list[float] = []  # seconds per timed two-process call

    def both(calls: int) -> list[Seconds]:
        """Wall seconds of the slower rank and CPU seconds of both ranks, per call."""
        two()
        times = []
        for _ in range(calls):
            dist.barrier()
            with traffic.recording():
                times.append(_seconds(two))
            in_collectives.append(traffic.seconds)
        wall, cpu = torch.tensor(times, dtype=torch.float64).unbind(1)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM)
        return list(zip(wall.tolist(), cpu.tolist(), strict=True))

    phases = {PHASES[0]: both, PHASES[1]: solo(one, 1), PHASES[2]: solo(one, 2)}
    # The untimed call of each phase is the first (probes, checks); the timed one sizes it.
    warm = {name: phase(1) for name, phase in phases.items()}
    seconds = torch.tensor([warm[name][0][0] if warm[name] else 0.0 for name in PHASES])
    dist.broadcast(seconds, 0)
    calls = {
        name: max(1, min(20, int(BUDGET / s)))
        for name, s in zip(PHASES, seconds.tolist(), strict=True)
    }

    with traffic.recording():
        two()
    sent = {"bytes": traffic.bytes}
    everyone: list[Any] = [None] * WORLD
    dist.all_gather_object(everyone, sent)

    check = _check(rank, fn, params, shard, inputs, two, one)

    times: dict[str, list[float]] = {name: [] for name in PHASES}
    cpu: dict[str, list[float]] = {name: [] for name in PHASES}
    in_collectives.clear()
    for repeat in range(repeats):
        shift = repeat % len(PHASES)
        for name in PHASES[shift:] + PHASES[:shift]:
            timed = phases[name](calls[name]) or [(0.0, 0.0)]  # rank 1 times no solo phase
            times[name].append(statistics.median(wall for wall, _ in timed))
            cpu[name].append(statistics.median(used for _, used in timed))
    params_count = sum(p.numel() for p in params.values())
    element = next(iter(params.values())).element_size()
    return {
        "model": model,
        "batch": batch,
        "params": params_count,
        "sent": everyone,
        "baseline": local * params_count * element,
        "times": times,
        "cpu": cpu,
        "in_collectives": statistics.median(in_collectives),
        "calls": calls,
        "check": check,
    }


def _check(
    rank: int,
    fn: Callable[..., Tensor],
    params: dict[str, Tensor],
    shard: tuple[Tensor, ...],
    inputs: tuple[Tensor, ...],
    two: Callable[[], Any],
    one: Callable[[], Any],
) -> dict[str, float]:
    """The two-process Gramian and direction against the single-process ones (rank 0), and
    rank 1's against rank 0's."""
    G = torchgram.gramian(fn, params, *shard, batch_dim=0, group=dist.group.WORLD)
    direction = _flat(two())
    rank0 = [G.clone(), direction.clone()]
    for t in rank0:
        dist.broadcast(t, 0)
    across = torch.tensor([max(_relative(G, rank0[0]), _relative(direction, rank0[1]))])
    dist.all_reduce(across, op=dist.ReduceOp.MAX)
    if rank != 0:
        return {}
    reference = torchgram.gramian(fn, params, *inputs, batch_dim=0)
    return {
        "gramian": _relative(G, reference),
        "direction": _relative(direction, _flat(one())),
        "across_ranks": float(across),
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _header(args: argparse.Namespace) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print("$ python " + " ".join(sys.argv))
    print(
        f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, Python "
        f"{platform.python_version()}, load average {load}"
    )
    print(
        f"{WORLD} processes (gloo, spawn, file:// init), 1 thread each; models "
        f"{', '.join(args.models)}; {args.repeats} repeats",
        flush=True,
    )


def _run(model: str, batch: int, repeats: int) -> dict[str, Any] | str:
    with tempfile.TemporaryDirectory() as folder:
        init, out = Path(folder, "init"), Path(folder, "result.json")
        try:
            mp.start_processes(
                _worker, args=(model, batch, repeats, str(init), str(out)), nprocs=WORLD,
                join=True, start_method="spawn",
            )  # fmt: skip
        except Exception as error:  # a model that fails is a result, not a crash
            last = (str(error).strip().splitlines() or [""])[-1]
            return f"fails ({type(error).__name__}: {last[:100]})"
        return json.loads(out.read_text())


def _print_tables(results: list[dict[str, Any]]) -> None:
    print("\nBytes sent per step per rank (MiB; rank 0, rank 1 when different):\n")
    print(
        "| model | B | P | factors (broadcast) | bands, losses (all_gather) | direction "
        "(all_reduce) | total | per-sample grads | per-sample / torchgram |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        per_rank = [s["bytes"] for s in r["sent"]]
        totals = [sum(b.values()) for b in per_rank]

        def cell(values: list[float]) -> str:
            shown = [_mib(values[0])] + [_mib(v) for v in values[1:] if _mib(v) != _mib(values[0])]
            return " / ".join(shown)

        parts = [
            cell([b[name] for b in per_rank]) for name in ("broadcast", "all_gather", "all_reduce")
        ]
        ratio = r["baseline"] / max(totals)
        print(
            f"| {r['model']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {' | '.join(parts)} | "
            f"{cell(totals)} | {_mib(r['baseline'])} | {ratio:.1f}x |"
        )
    print("\nTime per step (jd_grad with upgrad), ms, medians over the repeats:\n")
    print(
        "| model | 2 processes | of which in collectives | 1 process, 1 thread | 1 process, "
        "2 threads | 1p1t / 2p | 1p2t / 2p | CPU 2p (both ranks) | CPU 1p1t | CPU 2p / 1p1t "
        "| G rel. diff | direction rel. diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        two, one, one2 = (r["times"][name] for name in PHASES)
        cpu_two, cpu_one = r["cpu"][PHASES[0]], r["cpu"][PHASES[1]]
        ratios = [_median_ratio(a, b) for a, b in ((one, two), (one2, two), (cpu_two, cpu_one))]
        walls = [statistics.median(t) * 1e3 for t in (two, one, one2)]
        cpus = [statistics.median(t) * 1e3 for t in (cpu_two, cpu_one)]
        c = r["check"]
        print(
            f"| {r['model']} | {walls[0]:.1f} | {r['in_collectives'] * 1e3:.1f} | "
            f"{walls[1]:.1f} | {walls[2]:.1f} | {ratios[0]:.2f}x | {ratios[1]:.2f}x | "
            f"{cpus[0]:.1f} | {cpus[1]:.1f} | {ratios[2]:.2f}x | {c['gramian']:.1e} | "
            f"{c['direction']:.1e} |"
        )
    print(
        "\nWall ratios above 1: the two processes are faster. CPU: milliseconds of CPU time per "
        "step (process_time; both ranks summed for 2p), less sensitive than wall time to other "
        "load on the machine. Rel. diff: largest difference to the single-process result on the "
        "whole batch, relative to its largest entry (float32); rank 1's results differed from "
        "rank 0's by at most "
        + ", ".join(f"{r['check']['across_ranks']:.0e} ({r['model']})" for r in results)
        + "."
    )


def _median_ratio(a: list[float], b: list[float]) -> float:
    """The median over the repeats of ``a / b`` (both timed within the same repeat)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(ARCHITECTURES))
    parser.add_argument("--repeats", type=_positive, default=3, help="alternated repeats")
    parser.add_argument("--batch", type=_positive, help="global batch (the setting's by default)")
    parser.add_argument("--quick", action="store_true", help="MLP and CNN, 16 samples, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.models = args.models or ["mlp", "cnn"]
        args.batch = args.batch or 16
        args.repeats = 1
    args.models = args.models or list(MODELS)
    if args.batch is not None and args.batch % WORLD:
        parser.error(f"--batch must be a multiple of {WORLD} (one shard per process)")
    return args


def main() -> None:
    args = _arguments()
    torch.set_num_threads(1)
    _header(args)
    results = []
    for model in args.models:
        reason = missing(model)
        if reason:
            print(f"note: skipping {model}: {reason}", flush=True)
            continue
        torch.manual_seed(0)
        batch = args.batch or ARCHITECTURES[model]().inputs[0].shape[0]
        if batch % WORLD:
            print(f"note: skipping {model}: its batch {batch} is odd (pass --batch)", flush=True)
            continue
        start = time.perf_counter()
        result = _run(model, batch, args.repeats)
        if isinstance(result, str):
            print(f"{model}: {result}", flush=True)
            continue
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"{model}: done in {time.perf_counter() - start:.0f} s, calls per phase "
            f"{result['calls']} [load average {load}]",
            flush=True,
        )
        results.append(result)
    if results:
        _print_tables(results)


if __name__ == "__main__":
    main()
