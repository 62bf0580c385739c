"""Times every weighting of ``torchgram.weightings`` on one ``[m, m]`` Gramian.

Run ``python benchmarks/bench_weightings.py [--m 1024] [--dtypes float32 float64] [--repeats 3]``.
``G = J Jᵀ`` with ``J`` a standard normal ``[m, 2m]`` matrix (full rank). It prints one line per
weighting: the median milliseconds of ``--repeats`` calls after one warm-up call, per dtype.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from _timing import median_time

from torchgram import weightings as W

# options a weighting needs to run on any G (the others run with their defaults)
_OPTIONS: dict[str, Callable[[torch.Tensor], object]] = {
    "krum": partial(W.krum, n_byzantine=1),
    "constant": lambda G: W.constant(G, weights=torch.ones(G.shape[0])),
    "cr_mogm": partial(W.cr_mogm, weighting=W.mgda),
}
WEIGHTINGS: dict[str, Callable[[torch.Tensor], object]] = {
    name: _OPTIONS.get(name, getattr(W, name))
    for name in W.__all__
    if not isinstance(getattr(W, name), type)  # the states are NamedTuples
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=list(WEIGHTINGS), choices=list(WEIGHTINGS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    J = torch.randn(args.m, 2 * args.m, generator=torch.Generator().manual_seed(0))
    gramians = {name: (J @ J.T).to(getattr(torch, name)) for name in args.dtypes}
    print(f"m={args.m}, threads={args.threads}, median of {args.repeats} calls, ms")
    print(f"{'weighting':<12}" + "".join(f"{name:>10}" for name in args.dtypes))
    for name in args.only:
        times = [median_time(partial(WEIGHTINGS[name], G), args.repeats) for G in gramians.values()]
        print(f"{name:<12}" + "".join(f"{1e3 * t:>10.1f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
