"""What the benchmark scripts share: the median time of a call after one warm-up call, and the
options of the scripts that time single layers."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_time(run: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``run``, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_options(doc: str, repeats: int) -> argparse.Namespace:
    """``--repeats`` and ``--threads`` (default 2) of a script documented by ``doc``, parsed;
    torch set to that many threads and seeded."""
    import torch

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args
