"""Times ``torchgram.weightings.upgrad`` against TorchJD 0.18's ``UPGradWeighting``.

Run ``python benchmarks/bench_upgrad.py [--max-torchjd-m 256] [--dtype float64] [--threads 2]``.
For each m it builds ``G = J Jᵀ`` with ``J`` random (full rank ``[m, 2m]``, and rank deficient
``[m, m/8]`` with rows scaled over four orders of magnitude), times both weightings, and prints the
speed ratio, the largest weight difference relative to the largest weight, and the optimality (KKT)
residual of torchgram's solution. Needs ``torchjd==0.18.0`` with ``quadprog`` and ``qpsolvers``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from torchgram.weightings import upgrad
from torchgram.weightings._dual_cone import _kkt_residual


def _gramians(m: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(m)
    full = torch.randn(m, 2 * m, generator=generator, dtype=dtype)
    low = torch.randn(m, max(m // 8, 1), generator=generator, dtype=dtype)
    low = low * torch.logspace(-2, 2, m, dtype=dtype).unsqueeze(1)
    return {"full rank [m, 2m]": full @ full.T, "rank m/8, scaled": low @ low.T}


def _time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return (time.perf_counter() - start) / repeats, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--max-torchjd-m", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from torchjd.aggregation import UPGradWeighting

    reference = UPGradWeighting()
    header = f"{'m':>5} {'gramian':<18} {'torchgram s':>12} {'torchjd s':>10} {'speed-up':>9}"
    print(f"dtype={args.dtype}, threads={args.threads}")
    print(header + f" {'max |dw|/max|w|':>16} {'KKT residual':>13}")
    for m in args.sizes:
        for name, G in _gramians(m, dtype).items():
            repeats = 5 if m <= 256 else 1
            ours_s, w = _time(lambda G=G: upgrad(G), repeats)
            U = torch.diag(torch.full((m,), 1.0 / m, dtype=torch.float64))
            # Same solution as upgrad; recomputed here to measure its KKT residual in float64.
            from torchgram.weightings._dual_cone import _project_weights

            V = _project_weights(
                U, G.double(), norm_eps=1e-4, reg_eps=1e-4, max_iters=500, tol=None
            )
            kkt = _kkt_residual(V, U, G.double(), norm_eps=1e-4, reg_eps=1e-4).item()
            if m <= args.max_torchjd_m:
                theirs_s, w_ref = _time(lambda G=G: reference(G), 1 if m >= 256 else 3)
                diff = ((w - w_ref).abs().max() / w_ref.abs().max()).item()
                line = f"{theirs_s:>10.3f} {theirs_s / ours_s:>8.0f}x {diff:>16.1e}"
            else:
                line = f"{'skipped':>10} {'':>9} {'':>16}"
            print(f"{m:>5} {name:<18} {ours_s:>12.4f} {line} {kkt:>13.1e}", flush=True)


if __name__ == "__main__":
    main()
