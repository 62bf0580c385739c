"""Times the two forms of a linear map's Gramian, ghost and materialised, on a grid of shapes.

Run ``python benchmarks/bench_linear.py`` (``--repeats``, ``--threads``). For each shape (B
samples, T tokens, ``d_in -> d_out``, one output row per sample: the shapes of the benchmark's
transformers, ViT and MLP heads around the point where the forms cost the same) it times, side
by side in one process, ``ghost_gramian`` (never builds a per-sample gradient) and
``materialised_gramian`` (per-sample gradients, then their Gramian), prints each form's rate
(its multiply-adds by the cost model / its time) and marks the form that ``Linear.gramian``
takes (``*``) and whether it was the faster. The last lines give the median rate of each form
and their ratio, then for weights ``w`` of the materialised multiply-adds how often the slower
form would be taken and the time lost: ``torchgram._factors.MATERIALISED_WEIGHT`` is the ``w``
that loses the least. The last column and line: the ghost form in one block for the whole batch
against its blocks of ``_BLOCK_PRODUCTS`` products, as a ratio of times.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import torch
from _timing import layer_options, median_time

from torchgram import _factors as factors
from torchgram._factors import (
    MATERIALISED_WEIGHT,
    ghost_cost,
    ghost_gramian,
    materialised_cost,
    materialised_gramian,
    use_ghost,
)

BATCHES = (16, 32, 64)
TOKENS = (8, 17, 32, 64)
MAPS = ((192, 768), (768, 192), (192, 576), (256, 256), (128, 512), (64, 64))


WEIGHTS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


def _row(
    B: int, T: int, d_in: int, d_out: int, repeats: int, times: list[tuple[Any, ...]]
) -> tuple[str, float, float, bool]:
    A, D = torch.randn(B, T, d_in), torch.randn(1, B, T, d_out)
    ghost = median_time(lambda: ghost_gramian(A, D), repeats)
    materialised = median_time(lambda: materialised_gramian(A, D), repeats)
    blocks = factors._BLOCK_PRODUCTS
    factors._BLOCK_PRODUCTS = 2**62  # the ghost form in one block for the whole batch
    try:
        one_block = median_time(lambda: ghost_gramian(A, D), repeats)
    finally:
        factors._BLOCK_PRODUCTS = blocks
    times.append((A.shape, D.shape, ghost, materialised, one_block))
    ghost_rate = ghost_cost(A.shape, D.shape) / ghost / 1e9
    materialised_rate = materialised_cost(A.shape, D.shape) / materialised / 1e9
    chose_ghost = use_ghost(A.shape, D.shape)
    right = chose_ghost == (ghost < materialised)
    marks = ("*", "") if chose_ghost else ("", "*")
    verdict = "yes" if right else f"no ({max(ghost, materialised) / min(ghost, materialised):.2f}x)"
    line = (
        f"| {B} | {T} | {d_in} -> {d_out} | {ghost * 1e3:.2f}{marks[0]} | "
        f"{materialised * 1e3:.2f}{marks[1]} | {ghost_rate:.0f} | {materialised_rate:.0f} | "
        f"{verdict} | {one_block / ghost:.2f}x |"
    )
    return line, ghost_rate, materialised_rate, right


def main() -> None:
    args = layer_options(__doc__, repeats=10)
    print("| B | T | map | ghost (ms) | materialised (ms) | ghost GMAC/s | materialised GMAC/s "
          "| faster taken | ghost in one block |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---|---:|")
    rates: list[tuple[float, float]] = []
    times: list[tuple[Any, ...]] = []
    wrong = 0
    for B, T, (d_in, d_out) in itertools.product(BATCHES, TOKENS, MAPS):
        line, ghost_rate, materialised_rate, right = _row(B, T, d_in, d_out, args.repeats, times)
        print(line, flush=True)
        if d_in * d_out >= 2**15:  # the rates of maps large enough to run at full speed
            rates.append((ghost_rate, materialised_rate))
        wrong += not right
    ghost_rate = statistics.median(r[0] for r in rates)
    materialised_rate = statistics.median(r[1] for r in rates)
    print("\n* the form Linear.gramian takes; 'faster taken': whether it was the faster one.")
    ratio = ghost_rate / materialised_rate
    shapes = len(BATCHES) * len(TOKENS) * len(MAPS)
    print(f"Median rates over maps of at least 2^15 weights: ghost {ghost_rate:.0f} GMAC/s, "
          f"materialised {materialised_rate:.0f} GMAC/s, ratio {ratio:.2f} "
          f"(MATERIALISED_WEIGHT = {MATERIALISED_WEIGHT}). The slower form taken on {wrong} of "
          f"{shapes} shapes.")  # fmt: skip

    print("\nWith the materialised multiply-adds counted w times (the time lost: the slower form's "
          "minus the faster's, summed over the shapes where the slower is taken):")  # fmt: skip
    for weight in WEIGHTS:
        lost = [
            abs(ghost - materialised)
            for a, d, ghost, materialised, _ in times
            if use_ghost(a, d, materialised_weight=weight) != (ghost < materialised)
        ]
        total = sum(lost) * 1e3
        print(f"  w = {weight:.1f}: the slower form on {len(lost)} shapes, {total:.2f} ms lost")

    ratios = sorted(one_block / ghost for *_, ghost, _, one_block in times)
    print(f"\nThe ghost form in one block for the whole batch against blocks of "
          f"{factors._BLOCK_PRODUCTS} products: median {statistics.median(ratios):.2f}x the time, "
          f"quartiles {ratios[len(ratios) // 4]:.2f}x-{ratios[3 * len(ratios) // 4]:.2f}x, "
          f"range {ratios[0]:.2f}x-{ratios[-1]:.2f}x.")  # fmt: skip


if __name__ == "__main__":
    main()
