"""Where a method's time goes on one architecture of ``models.py``: torch ops and Python functions.

Run ``python benchmarks/profile_gramian.py --arch gpt2-tiny`` (``--method`` any method of
``bench_gramian.py``, torchgram by default). After one warm-up call (the first call's probe and
checks are not profiled), it prints the median times of the step and the method, then the top
torch ops by self time over ``--calls`` calls (``torch.profiler``), then the top Python
functions by cumulative and by own time over as many calls (``cProfile``). CPU, 2 threads.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats

import torch
from _timing import median_time
from bench_gramian import MAKERS
from models import ARCHITECTURES
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=list(ARCHITECTURES), required=True)
    parser.add_argument("--method", choices=list(MAKERS), default="torchgram")
    parser.add_argument("--calls", type=int, default=5, help="calls profiled")
    parser.add_argument("--top", type=int, default=25, help="rows of each listing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    setting = ARCHITECTURES[args.arch]()
    step, run = MAKERS["step"](setting), MAKERS[args.method](setting)
    run()  # the first call: probe, checks, lazy imports
    seconds = {name: median_time(f, args.calls) for name, f in (("step", step), ("run", run))}
    print(
        f"{args.arch}: step {seconds['step'] * 1e3:.1f} ms, {args.method} "
        f"{seconds['run'] * 1e3:.1f} ms ({seconds['run'] / seconds['step']:.2f}x)\n"
    )
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in range(args.calls):
            run()
    averages = profiled.key_averages()
    print(
        averages.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=50)
    )
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        run()
    profiler.disable()
    _print_torchgram_functions(pstats.Stats(profiler), args.calls, args.top)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())


RUNS = ("linearise_batched", "linearise_vmapped", "linearise_looped", "linearise_whole")


def _print_torchgram_functions(stats: pstats.Stats, calls: int, top: int) -> None:
    """torchgram's own functions by cumulative time per call of the method, and which of its
    runs the calls took (the ``linearise_*`` functions that ran)."""
    rows = []
    marker = f"{os.sep}torchgram{os.sep}"
    for (path, line, name), timing in stats.stats.items():  # type: ignore[attr-defined]
        _, count, own, cumulative, _ = timing
        if marker in path:
            where = f"{path.split(marker)[-1]}:{line}({name})"
            rows.append((cumulative / calls, own / calls, count / calls, where, name))
    runs = sorted(f"{name} x{count:g}" for *_, count, _, name in rows if name in RUNS)
    print(f"torchgram's runs per call: {', '.join(runs) or 'none'}")
    print(f"{'cum ms':>8} {'own ms':>8} {'calls':>6}  torchgram function (per call of the method)")
    for cumulative, own, count, where, _ in sorted(rows, reverse=True)[:top]:
        print(f"{cumulative * 1e3:8.2f} {own * 1e3:8.2f} {count:6g}  {where}")
    print()


if __name__ == "__main__":
    main()
