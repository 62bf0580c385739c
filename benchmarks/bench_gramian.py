"""Times torchgram's ``gramian`` against a plain training step, TorchJD and per-sample gradients.

Run ``python benchmarks/bench_gramian.py`` (all architectures), ``--quick`` for a smoke run (one
timed repeat, no memory measurement), ``--arch NAME`` for one architecture. For each architecture
and each method it reports the median time as a ratio to the reference (one forward and backward
pass of the same model on the same batch, the loss being the mean of the per-sample losses) and
the peak memory, measured in a process of its own (``--measure-memory METHOD ARCH``) as the growth
of the peak resident set size during one call (after a warm-up call, see ``measure_memory``).

Methods:

- ``step``: forward and ``backward`` of the mean loss (the reference).
- ``torchgram``: ``torchgram.gramian_of(fn, batch_dim=...)``, built once and called on
  ``(params, x, y)`` each time, as a training loop does (forward included). Its first call (the
  warm-up) also runs fn once to learn shapes and checks two samples; later calls skip both.
- ``torchjd``: TorchJD 0.18's ``autogram.Engine(model, batch_dim=...)``: forward, then
  ``engine.compute_gramian(losses)``. Skipped with a note if ``torchjd`` is not importable.
- ``torchgram-vmap`` (only when asked for with ``--methods``): torchgram with fn always run
  under ``vmap`` over the samples, i.e. without its batched run (an ablation).
- ``per-sample``: ``vmap(grad)`` (``jacrev`` for several losses per sample) of the losses, the
  Jacobian ``J`` flattened to ``[m, P]``, then ``J @ J.T``.

Each method is timed against the step, the pair in fresh processes of its own (``--processes``,
3 by default, each with ``--repeats`` timed repeats; the ratio is the median of the processes'
ratios, see ``_ratio``; ``--one-process``: every architecture and method in this one; see
``_times_in_subprocess`` for why). CPU, 2 threads (``--threads``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import torchgram

Tensor = torch.Tensor
METHODS = ("step", "torchgram", "torchjd", "per-sample")


@dataclass
class Setting:
    """One architecture with its batch: ``losses(model_output, y)`` gives the per-row losses."""

    model: nn.Module
    x: Tensor
    y: Tensor
    losses: Callable[[Tensor, Tensor], Tensor]
    batch_dim: int | None


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _mlp() -> Setting:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )  # fmt: skip
    return Setting(model, torch.randn(64, 784), torch.randint(0, 10, (64,)), _cross_entropy, 0)


def _cnn() -> Setting:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    x = torch.randn(64, 3, 32, 32)
    return Setting(model, x, torch.randint(0, 10, (64,)), _cross_entropy, 0)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(8, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


def _resnet18() -> Setting:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.GroupNorm(8, 64)]
    layers.append(nn.ReLU())
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(c_in, c_out, stride), _Block(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    model = nn.Sequential(*layers)
    x = torch.randn(32, 3, 32, 32)
    return Setting(model, x, torch.randint(0, 10, (32,)), _cross_entropy, 0)


class _Positions(nn.Module):
    """Learned position embeddings, added (a module of its own so that TorchJD can hook it)."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.02 * torch.randn(tokens, width))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.weight


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        B, T, width = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(mixed.transpose(1, 2).reshape(B, T, width))


class _TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = _Attention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attention(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class _LanguageModel(nn.Module):
    """A GPT-style causal language model (pre-norm blocks)."""

    def __init__(self, vocab: int = 512, width: int = 256, tokens: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = _Positions(tokens, width)
        self.blocks = nn.Sequential(*(_TransformerBlock(width, 4) for _ in range(2)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.blocks(self.position(self.embed(tokens)))
        return self.head(self.norm(h))


def _sequence_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(-1)


def _transformer() -> Setting:
    x = torch.randint(0, 512, (32, 64))
    return Setting(_LanguageModel(), x, torch.randint(0, 512, (32, 64)), _sequence_loss, 0)


class _MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(512, 1) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], dim=-1)  # [B, 2]


def _task_losses(out: Tensor, y: Tensor) -> Tensor:
    return (out - y) ** 2  # [B, 2]


def _batch_task_losses(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean(0)  # [2]: one loss per task over the batch


def _instance_wise() -> Setting:
    return Setting(_MultiTask(), torch.randn(64, 784), torch.randn(64, 2), _task_losses, 0)


def _multi_task() -> Setting:
    x, y = torch.randn(64, 784), torch.randn(64, 2)
    return Setting(_MultiTask(), x, y, _batch_task_losses, None)


ARCHITECTURES: dict[str, Callable[[], Setting]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet18-gn": _resnet18,
    "transformer-lm": _transformer,
    "iwmtl": _instance_wise,
    "mtl-batch-none": _multi_task,
}


def _functional(setting: Setting) -> tuple[Callable[..., Tensor], dict[str, Tensor]]:
    model = setting.model
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return setting.losses(functional_call(model, params, (x,)), y)

    return fn, params


def _step(setting: Setting) -> Callable[[], Any]:
    parameters = list(setting.model.parameters())

    def run() -> Any:
        loss = setting.losses(setting.model(setting.x), setting.y).mean()
        return torch.autograd.grad(loss, parameters)

    return run


def _torchgram(setting: Setting) -> Callable[[], Any]:
    fn, params = _functional(setting)
    transform = torchgram.gramian_of(fn, batch_dim=setting.batch_dim)  # built once, as in training
    return lambda: transform(params, setting.x, setting.y)


def _torchjd(setting: Setting) -> Callable[[], Any]:
    from torchjd.autogram import Engine

    model = copy.deepcopy(setting.model)  # the engine's hooks stay off the other methods' model
    engine = Engine(model, batch_dim=setting.batch_dim)

    def run() -> Any:
        return engine.compute_gramian(setting.losses(model(setting.x), setting.y))

    return run


def _per_sample(setting: Setting) -> Callable[[], Any]:
    fn, params = _functional(setting)
    with torch.no_grad():
        several = fn(params, setting.x[:2], setting.y[:2]).dim() > 1  # e.g. [B, 2] losses

    def one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return fn(params, x.unsqueeze(0), y.unsqueeze(0)).squeeze(0)

    def run() -> Tensor:
        if setting.batch_dim is None:
            jac = jacrev(fn)(params, setting.x, setting.y)
        else:
            per_row = jacrev if several else grad
            jac = vmap(per_row(one), in_dims=(None, 0, 0))(params, setting.x, setting.y)
        name = next(iter(params))
        rows = jac[name].numel() // params[name].numel()
        J = torch.cat([j.reshape(rows, -1) for j in jac.values()], dim=1)
        return J @ J.T

    return run


def _torchgram_vmapped(setting: Setting) -> Callable[[], Any]:
    """torchgram with its batched run switched off: fn always runs under vmap over the samples
    (an ablation, to see what the batched run gains; it reaches into torchgram's internals)."""
    import torchgram._run

    run = _torchgram(setting)
    may_batch = torchgram._run._may_batch

    def vmapped() -> Any:
        torchgram._run._may_batch = lambda *args: False  # type: ignore[assignment]
        try:
            return run()
        finally:
            torchgram._run._may_batch = may_batch

    return vmapped


MAKERS = {
    "step": _step,
    "torchgram": _torchgram,
    "torchjd": _torchjd,
    "per-sample": _per_sample,
    "torchgram-vmap": _torchgram_vmapped,
}


def _torchjd_missing() -> str | None:
    try:
        import torchjd.autogram  # noqa: F401
    except ImportError as error:
        return f"torchjd not importable ({error}); pip install torchjd==0.18.0"
    return None


def _time(
    runs: dict[str, Callable[[], Any]], repeats: int, budget: float = 0.1
) -> dict[str, list[float]]:
    """Seconds of each run per repeat, each in its steady state, as in a training loop.

    Repeats interleave the methods, so that load drifts hit all of them alike, and rotate their
    order (repeat r starts with method r mod M). Within a repeat each method is called once
    untimed, then timed over as many calls in a row as fit in ``budget`` seconds (at least one),
    and the repeat keeps their median: a call's time depends on what ran just before it (caches,
    the allocator's free memory), and one call of a millisecond is at the mercy of the machine.
    Run once each in a fixed order, the step ran after the per-sample recipe and took 40 ms for
    the CNN and 2.7 ms for ``iwmtl``, against 27 and 1.8 ms after itself.
    """
    calls = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()  # warm-up
        calls[name] = max(1, min(50, int(budget / (time.perf_counter() - start))))
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name]()  # after itself, as in training
            timed = []
            for _ in range(calls[name]):
                start = time.perf_counter()
                runs[name]()
                timed.append(time.perf_counter() - start)
            times[name].append(statistics.median(timed))
    return times


def _ratio(in_processes: list[dict[str, list[float]]], method: str) -> tuple[float, str]:
    """``method``'s time as a ratio to the step's, and how much it moved.

    Each process gives one ratio, of the medians of its repeats; the result is the median of
    the processes' ratios. The step's time moves between processes (``iwmtl``'s took 1.6 or
    2.0-2.4 ms, in two groups, and the ratio was lower in the slow ones), so one process's
    ratio depends on which group it fell in; the median of three is steadier at the cost of the
    same number of repeats. The spread gives each process's ratio and the lowest and highest of
    the per-repeat ratios (the method and the step timed within the same repeat).
    """
    per_process = [
        statistics.median(t[method]) / statistics.median(t["step"]) for t in in_processes
    ]
    per_repeat = sorted(
        m / s for t in in_processes for m, s in zip(t[method], t["step"], strict=True)
    )
    spread = f"per repeat {per_repeat[0]:.2f}-{per_repeat[-1]:.2f}x"
    if len(per_process) > 1:
        spread = "per process " + "/".join(f"{r:.2f}" for r in per_process) + "x, " + spread
    return statistics.median(per_process), spread


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process image.

    On Linux ``VmHWM``: ``ru_maxrss`` would carry the parent's peak across ``exec``, and the
    parent (this benchmark) has run every method by then.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak() -> int:
    """Reset the peak RSS to the current RSS where Linux allows it; return the new baseline."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # 5: reset VmHWM to the current resident set size
    except OSError:
        pass
    return _peak_rss_bytes()


def measure_memory(method: str, arch: str, threads: int) -> None:
    """Print the peak RSS growth (bytes) of one call of ``method``, in this fresh process.

    One warm-up call first (lazy imports, allocator pools), then the peak is reset (on Linux)
    and one call is measured.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    setting = ARCHITECTURES[arch]()
    run = MAKERS[method](setting)
    run()
    gc.collect()
    baseline = _reset_peak()
    run()
    print(json.dumps({"peak_bytes": _peak_rss_bytes() - baseline}))


def _memory_in_subprocess(method: str, arch: str, threads: int) -> float | None:
    command = [sys.executable, __file__, "--measure-memory", method, arch]
    command += ["--threads", str(threads)]
    # Blocks of 64 KiB and more straight from (and back to) the OS, so that the resident set
    # follows live tensors instead of what glibc's heap keeps after the warm-up call.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        print(f"  memory of {method} on {arch} failed: {result.stderr.strip()[-300:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def _time_architecture(arch: str, methods: list[str], repeats: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    setting = ARCHITECTURES[arch]()
    return _time({m: MAKERS[m](setting) for m in methods}, repeats)


def _times_in_subprocess(
    arch: str, methods: list[str], repeats: int, threads: int
) -> dict[str, list[float]]:
    """:func:`_time` of some methods on one architecture, in a fresh process.

    The run times each method against the step, the pair in processes of its own, because what
    else runs in a process moves the ratios, and not alike for all methods (the allocator's and
    the caches' state). Timed in one process with TorchJD and the per-sample recipe (which
    allocate 400-650 MiB per call on these models), ``iwmtl`` and ``mtl-batch-none`` measured
    1.53-1.65x and 1.66-1.72x, against 1.32-1.47x and 1.42-1.55x with the step alone; and timed
    after the other architectures in one process, 1.63x and 1.62x, while the CNN timed after
    the two small models measured 1.02x with its step at 45 ms instead of 27-31 ms. A training
    process runs one model and one method. (The step's own time also moves between processes:
    ``iwmtl``'s takes 1.6 or 2.0-2.4 ms, and the ratio is lower in the slow ones, as if both
    methods paid the same fixed extra.)
    """
    command = [sys.executable, __file__, "--time-one", arch, "--methods", *methods]
    command += ["--repeats", str(repeats), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"timing {arch} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cell(ratio: float | None, memory: float | None) -> str:
    if ratio is None:
        return "n/a"
    text = f"{ratio:.2f}x"
    if memory is not None:
        text += f", {memory / 2**20:.0f} MiB"
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one process, one timed repeat, no memory"
    )
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), action="append")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(MAKERS),
        default=list(METHODS),
        help="methods to compare (torchgram-vmap: torchgram without its batched run)",
    )
    parser.add_argument("--repeats", type=_positive, default=3, help="timed repeats per process")
    parser.add_argument(
        "--processes",
        type=_positive,
        default=3,
        help="fresh processes per method and architecture (the ratio is their median)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="time every architecture in this process (by default each in a fresh one)",
    )
    parser.add_argument("--measure-memory", nargs=2, metavar=("METHOD", "ARCH"))
    parser.add_argument("--time-one", metavar="ARCH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        measure_memory(*args.measure_memory, args.threads)
        return
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    if args.quick:
        args.processes = 1
    methods = list(args.methods)
    missing = _torchjd_missing()
    if missing and "torchjd" in methods:
        print(f"note: skipping torchjd: {missing}")
        methods.remove("torchjd")
    if args.time_one:  # a subprocess of the run below: one architecture's times, as JSON
        print(json.dumps(_time_architecture(args.time_one, methods, repeats)))
        return
    if "step" not in methods:
        methods.insert(0, "step")  # the reference of every ratio
    rows = []
    for arch in args.arch or list(ARCHITECTURES):
        others = [m for m in methods if m != "step"]
        if args.one_process:
            every = _time_architecture(arch, methods, repeats)
            groups = {m: [{"step": every["step"], m: every[m]}] for m in others}
        else:  # each method against the step, the pair in fresh processes of its own
            groups = {m: [] for m in others}
            for _ in range(args.processes):  # processes interleaved, so drifts hit all alike
                for m in others:
                    groups[m].append(_times_in_subprocess(arch, ["step", m], repeats, args.threads))
        ratios, spreads = {"step": 1.0}, {}
        step_seconds = [statistics.median(t["step"]) for g in groups.values() for t in g]
        for m, in_processes in groups.items():
            ratios[m], spreads[m] = _ratio(in_processes, m)
        memory = {
            m: None if args.quick else _memory_in_subprocess(m, arch, args.threads) for m in methods
        }
        rows.append((arch, statistics.median(step_seconds), ratios, memory))
        cells = ", ".join(f"{m} {ratios[m]:.2f}x" for m in others)
        steps = ", ".join(f"{t * 1e3:.1f}" for t in step_seconds)
        if repeats > 1 or len(step_seconds) > len(others):
            cells += " (" + "; ".join(f"{m} {r}" for m, r in spreads.items()) + ")"
        print(f"{arch}: step {steps} ms; {cells}", flush=True)
    _print_table(rows, methods)


def _print_table(
    rows: list[tuple[str, float, dict[str, float], dict[str, Any]]], methods: list[str]
) -> None:
    print()
    print("| architecture | step (ms) | " + " | ".join(methods) + " |")
    print("|---|---:|" + "---:|" * len(methods))
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for arch, step, of_arch, memory in rows:
        cells = []
        for m in methods:
            ratios[m].append(of_arch[m])
            cells.append(_cell(of_arch[m], memory[m]))
        print(f"| {arch} | {step * 1e3:.1f} | " + " | ".join(cells) + " |")
    means = [f"{math.exp(statistics.fmean(math.log(r) for r in ratios[m])):.2f}x" for m in methods]
    print("| geometric mean | | " + " | ".join(means) + " |")
    print(
        "\nCells: median time / median time of `step` (each method timed against the step in "
        "processes of its own, the median of their ratios), peak RSS growth in a separate process."
    )


if __name__ == "__main__":
    main()
