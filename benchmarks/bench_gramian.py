"""Times torchgram's Gramian against a plain training step and the peers, on real models.

Run ``python benchmarks/bench_gramian.py`` (all architectures of ``models.py``), ``--quick`` for
a smoke run (one timed repeat, no memory measurement), ``--arch NAME`` for one architecture
(repeatable), ``--methods ...`` for some methods. For each architecture and each method it
reports the median time as a ratio to the reference (one forward and backward pass of the same
model on the same batch, the loss being the mean of the losses) and the peak memory, measured in
a process of its own (``--measure-memory METHOD ARCH``) as the growth of the peak resident set
size during one call (after a warm-up call, see ``measure_memory``). A method that cannot run on
an architecture is reported as ``n/a`` (with why) or ``fails (ExceptionType: message)``.

Methods:

- ``step``: forward and ``backward`` of the mean loss (the reference).
- ``torchgram``: ``torchgram.gramian_of(fn, batch_dim=...)``, built once and called on
  ``(params, *inputs)`` each time, as a training loop does (forward included). Its first call
  (the warm-up) also runs fn once to learn shapes and checks two samples; later calls skip both.
- ``eager``: ``torchgram.gramian(fn, params, *inputs, batch_dim=...)`` called each time (the
  eager form, which remembers what it learned per fn).
- ``per-sample``: ``vmap(grad)`` (``jacrev`` for several losses per sample, ``jacrev`` of fn
  with ``batch_dim=None``) of the losses, the Jacobian ``J`` flattened to ``[m, P]``, then
  ``J @ J.T``.
- ``torchjd``: TorchJD 0.18's ``autogram.Engine(model, batch_dim=...)``: forward, then
  ``engine.compute_gramian(losses)``. ``n/a`` if ``torchjd`` is not importable.
- ``opacus``: Opacus 1.6's ghost clipping (``GradSampleModuleFastGradientClipping`` on the
  model after ``ModuleValidator.fix``, which swaps in its own attention and LSTM): forward,
  backward of the mean loss, then the per-sample gradient norms. Only the diagonal of ``G``: a
  lower bound of the work. ``n/a`` without ``batch_dim``, with BatchNorm (which ``fix`` would
  replace by GroupNorm, another model) or if ``opacus`` is not importable.
- ``sgd-step``: the step, then ``optimizer.step()`` of ``torch.optim.SGD``.
- ``jd-step``: a Jacobian-descent step: ``torchgram.jd_grad(fn, torchgram.weightings.upgrad,
  batch_dim=...)`` built once, its direction written into ``.grad`` with ``torchgram.set_grad``,
  then the same ``optimizer.step()``. ``jd-step / sgd-step`` is the overhead of Jacobian descent.
- ``torchgram-vmap`` (only when asked for with ``--methods``): torchgram with fn always run
  under ``vmap`` over the samples, i.e. without its batched run (an ablation).

Each method is timed against the step, the pair in fresh processes of its own (``--processes``,
3 by default, each with ``--repeats`` timed repeats; the ratio is the median of the processes'
ratios, see ``_ratio``; ``--one-process``: every method of an architecture in one process; see
``_times_in_subprocess`` for why). CPU, 2 threads (``--threads``); ``--threads 1`` where other
processes share the cores, as two threads then wait for each other at every op (``iwmtl``'s
step took 49 ms instead of 2 beside a test run on two cores).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from models import ARCHITECTURES, Setting, missing
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import torchgram

Tensor = torch.Tensor
METHODS = (
    "step", "torchgram", "eager", "per-sample", "torchjd", "opacus", "sgd-step", "jd-step"
)  # fmt: skip
LEARNING_RATE = 1e-4  # small: the weights barely move over the timed steps


class NotApplicable(Exception):
    """A method that does not apply to an architecture (reported as ``n/a``, with why)."""


def _functional(
    model: nn.Module, setting: Setting
) -> tuple[Callable[..., Tensor], dict[str, Tensor]]:
    """``fn(params, *inputs)``: the setting's losses with ``model``'s parameters taken from
    ``params`` (detached views of the parameters: an optimiser's updates show through)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(params: dict[str, Tensor], *inputs: Tensor) -> Tensor:
        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, params, args, kwargs)

        return setting.losses(call, *inputs)

    return fn, params


def _step(setting: Setting) -> Callable[[], Any]:
    parameters = list(setting.model.parameters())

    def run() -> Any:
        loss = setting.losses(setting.model, *setting.inputs).mean()
        return torch.autograd.grad(loss, parameters)

    return run


def _torchgram(setting: Setting) -> Callable[[], Any]:
    fn, params = _functional(setting.model, setting)
    transform = torchgram.gramian_of(fn, batch_dim=setting.batch_dim)  # built once, as in training
    return lambda: transform(params, *setting.inputs)


def _eager(setting: Setting) -> Callable[[], Any]:
    fn, params = _functional(setting.model, setting)
    return lambda: torchgram.gramian(fn, params, *setting.inputs, batch_dim=setting.batch_dim)


def _per_sample(setting: Setting) -> Callable[[], Any]:
    fn, params = _functional(setting.model, setting)
    inputs = setting.inputs
    with torch.no_grad():
        several = fn(params, *inputs).dim() > 1 + (setting.batch_dim is None)  # e.g. [B, 2]

    def one(params: dict[str, Tensor], *sample: Tensor) -> Tensor:
        return fn(params, *(t.unsqueeze(0) for t in sample)).squeeze(0)

    def run() -> Tensor:
        if setting.batch_dim is None:
            jac = jacrev(fn)(params, *inputs)
        else:
            per_row = jacrev if several else grad
            jac = vmap(per_row(one), in_dims=(None, *(0 for _ in inputs)))(params, *inputs)
        name = next(iter(params))
        rows = jac[name].numel() // params[name].numel()
        J = torch.cat([j.reshape(rows, -1) for j in jac.values()], dim=1)
        return J @ J.T

    return run


def _torchjd(setting: Setting) -> Callable[[], Any]:
    if importlib.util.find_spec("torchjd") is None:
        raise NotApplicable("torchjd not installed; pip install torchjd==0.18.0")
    from torchjd.autogram import Engine

    model = copy.deepcopy(setting.model)  # the engine's hooks stay off the other methods' model
    engine = Engine(model, batch_dim=setting.batch_dim)

    def run() -> Any:
        return engine.compute_gramian(setting.losses(model, *setting.inputs))

    return run


def _opacus(setting: Setting) -> Callable[[], Any]:
    if setting.batch_dim != 0:
        raise NotApplicable("per-sample norms need samples (batch_dim=0)")
    if importlib.util.find_spec("opacus") is None:
        raise NotApplicable("opacus not installed; pip install opacus==1.6.0")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.validators import ModuleValidator

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in setting.model.modules()):
        raise NotApplicable("BatchNorm: Opacus would swap it for GroupNorm, another model")
    # As Opacus's users do: its own nn.MultiheadAttention and nn.LSTM (the same functions).
    # Its hooks record only in training mode (the models here have no dropout).
    model = GradSampleModuleFastGradientClipping(
        ModuleValidator.fix(setting.model).train(), batch_first=True, loss_reduction="mean"
    )
    parameters = [p for p in model.parameters() if p.requires_grad]

    def run() -> Tensor:
        loss = setting.losses(model, *setting.inputs).mean()
        torch.autograd.grad(loss, parameters)  # the hooks store each parameter's norms
        return model.get_norm_sample()  # [B]

    return run


def _sgd_step(setting: Setting) -> Callable[[], Any]:
    model = copy.deepcopy(setting.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def run() -> None:
        optimizer.zero_grad()
        setting.losses(model, *setting.inputs).mean().backward()
        optimizer.step()

    return run


def _jd_step(setting: Setting) -> Callable[[], Any]:
    model = copy.deepcopy(setting.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    fn, params = _functional(model, setting)
    direction = torchgram.jd_grad(
        fn, torchgram.weightings.upgrad, batch_dim=setting.batch_dim
    )  # built once, as in training

    def run() -> None:
        torchgram.set_grad(model, direction(params, *setting.inputs))
        optimizer.step()

    return run


def _torchgram_vmapped(setting: Setting) -> Callable[[], Any]:
    """torchgram without its batched run: with ``check_samples=False`` fn always runs under
    vmap over the samples (the batched run is only taken once checked), an ablation to see what
    the batched run gains."""
    fn, params = _functional(setting.model, setting)
    transform = torchgram.gramian_of(fn, batch_dim=setting.batch_dim, check_samples=False)
    return lambda: transform(params, *setting.inputs)


MAKERS: dict[str, Callable[[Setting], Callable[[], Any]]] = {
    "step": _step,
    "torchgram": _torchgram,
    "eager": _eager,
    "per-sample": _per_sample,
    "torchjd": _torchjd,
    "opacus": _opacus,
    "sgd-step": _sgd_step,
    "jd-step": _jd_step,
    "torchgram-vmap": _torchgram_vmapped,
}


def _failure(error: BaseException) -> str:
    """How a method that raised is reported: ``n/a (why)`` or ``fails (Type: message)``."""
    if isinstance(error, NotApplicable):
        return f"n/a ({error})"
    message = " ".join(str(error).split())[:80]
    return f"fails ({type(error).__name__}: {message})"


def _prepare(
    setting: Setting, methods: list[str]
) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """Each method's run, built and called once (the first call: probes, checks, lazy imports),
    and the failures of those that could not (``_failure``'s text)."""
    runs, failed = {}, {}
    for name in methods:
        try:
            run = MAKERS[name](setting)
            run()
        except Exception as error:  # a method that cannot run here is a result, not a crash
            failed[name] = _failure(error)
        else:
            runs[name] = run
        gc.collect()
    return runs, failed


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


def _trim() -> None:
    """Give the memory glibc keeps free back to the OS (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_memory(method: str, arch: str, threads: int) -> None:
    """Print the peak RSS growth (bytes) of one call of ``method``, in this fresh process.

    One warm-up call first (lazy imports, allocator pools), then glibc gives back the memory it
    kept free (``malloc_trim``: without it the measured call reused pages the warm-up had freed,
    and a method could read 0 B where it needs 2 MiB), the peak is reset (on Linux) and one call
    is measured: the resident memory the call needs beyond what was live before it.
    A method that cannot run prints its failure instead.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    runs, failed = _prepare(ARCHITECTURES[arch](), [method])
    if failed:
        print(json.dumps({"failed": failed[method]}))
        return
    gc.collect()
    _trim()
    baseline = _reset_peak()
    runs[method]()
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
    return json.loads(result.stdout.strip().splitlines()[-1]).get("peak_bytes")


def _time_architecture(arch: str, methods: list[str], repeats: int) -> dict[str, Any]:
    """``{"times": {method: seconds per repeat}, "failed": {method: why}}`` in this process."""
    torch.manual_seed(0)
    runs, failed = _prepare(ARCHITECTURES[arch](), methods)
    if "step" in failed:
        return {"times": {}, "failed": {m: failed["step"] for m in methods}}
    return {"times": _time(runs, repeats), "failed": failed}


def _times_in_subprocess(
    arch: str, methods: list[str], repeats: int, threads: int
) -> dict[str, Any]:
    """:func:`_time_architecture` of some methods on one architecture, in a fresh process.

    The run times each method against the step, the pair in processes of its own, because what
    else runs in a process moves the ratios, and not alike for all methods (the allocator's and
    the caches' state). Timed in one process with TorchJD and the per-sample recipe (which
    allocate 400-650 MiB per call on these models), ``iwmtl`` and ``mtl-batch-none`` measured
    1.53-1.65x and 1.66-1.72x, against 1.32-1.47x and 1.42-1.55x with the step alone; and timed
    after the other architectures in one process, 1.63x and 1.62x, while the CNN timed after
    the two small models measured 1.02x with its step at 45 ms instead of 27-31 ms. A training
    process runs one model and one method. (The step's own time also moves between processes:
    ``iwmtl``'s takes 1.6 or 2.0-2.4 ms, and the ratio is lower in the slow ones, as if both
    methods paid the same fixed extra.) A process that dies (killed for memory, a crash in a
    kernel) fails the methods it timed.
    """
    command = [sys.executable, __file__, "--time-one", arch, "--methods", *methods]
    command += ["--repeats", str(repeats), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1][:80]
        why = f"fails (process exited with {result.returncode}: {last})"
        return {"times": {}, "failed": {m: why for m in methods}}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one process, one timed repeat, no memory"
    )
    parser.add_argument("--arch", choices=list(ARCHITECTURES), action="append")
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
        help="time all methods of an architecture in one process (by default each method "
        "against the step in fresh ones)",
    )
    parser.add_argument("--measure-memory", nargs=2, metavar=("METHOD", "ARCH"))
    parser.add_argument("--time-one", metavar="ARCH", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    if args.measure_memory:
        method, arch = args.measure_memory
        measure_memory(method, arch, args.threads)
        return
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    if args.quick:
        args.processes = 1
    methods = list(args.methods)
    if args.time_one:  # a subprocess of the run below: one architecture's times, as JSON
        print(json.dumps(_time_architecture(args.time_one, methods, repeats)))
        return
    if "step" not in methods:
        methods.insert(0, "step")  # the reference of every ratio
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.threads} threads, {os.cpu_count()} cores, load average {load}", flush=True)
    rows = []
    for arch in args.arch or list(ARCHITECTURES):
        reason = missing(arch)
        if reason:
            print(f"note: skipping {arch}: {reason}", flush=True)
            continue
        rows.append(_run_architecture(arch, methods, repeats, args))
    _print_table(rows, methods)


Row = tuple[str, float, dict[str, float], dict[str, str]]  # arch, step (s), ratios, cells


def _run_architecture(arch: str, methods: list[str], repeats: int, args: argparse.Namespace) -> Row:
    """Times and memory of every method on one architecture, printed as they come."""
    others = [m for m in methods if m != "step"]
    failed: dict[str, str] = {}
    groups: dict[str, list[dict[str, list[float]]]] = {m: [] for m in others}
    if args.one_process:
        every = _time_architecture(arch, methods, repeats)
        failed = every["failed"]
        for m in others:
            if m not in failed:
                groups[m].append({"step": every["times"]["step"], m: every["times"][m]})
    else:  # each method against the step, the pair in fresh processes of its own
        for _ in range(args.processes):  # processes interleaved, so drifts hit all alike
            for m in others:
                if m in failed:
                    continue  # what failed once fails again: no point in timing it
                result = _times_in_subprocess(arch, ["step", m], repeats, args.threads)
                if m in result["failed"]:
                    failed[m] = result["failed"][m]
                else:
                    groups[m].append(result["times"])
    ratios, spreads, cells = {"step": 1.0}, {}, {}
    for m, in_processes in groups.items():
        if in_processes:
            ratios[m], spreads[m] = _ratio(in_processes, m)
    step_seconds = [statistics.median(t["step"]) for g in groups.values() for t in g]
    for m in methods:
        if m in failed:
            cells[m] = failed[m]
            continue
        memory = None if args.quick else _memory_in_subprocess(m, arch, args.threads)
        cells[m] = f"{ratios[m]:.2f}x" + ("" if memory is None else f", {memory / 2**20:.0f} MiB")
    step = statistics.median(step_seconds) if step_seconds else math.nan
    timed = ", ".join(f"{m} {ratios[m]:.2f}x" for m in others if m in ratios) or "nothing timed"
    if spreads and (repeats > 1 or len(step_seconds) > len(spreads)):
        timed += " (" + "; ".join(f"{m} {r}" for m, r in spreads.items()) + ")"
    steps = ", ".join(f"{t * 1e3:.1f}" for t in step_seconds)
    steps = f"{steps} ms" if steps else "not timed"
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{arch}: step {steps}; {timed} [load average {load}]", flush=True)
    for m, why in failed.items():
        print(f"  {m}: {why}", flush=True)
    return arch, step, ratios, cells


def _print_table(rows: list[Row], methods: list[str]) -> None:
    """The results as a Markdown table, with the geometric mean of each method's ratios over
    the architectures where it ran, and ``jd-step / sgd-step`` when both were timed."""
    overhead = "jd-step" in methods and "sgd-step" in methods
    extra = " jd-step / sgd-step |" if overhead else ""
    print()
    print("| architecture | step (ms) | " + " | ".join(methods) + " |" + extra)
    print("|---|---:|" + "---:|" * (len(methods) + overhead))
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    jd_overheads = []
    for arch, step, of_arch, cells in rows:
        for m in methods:
            if m in of_arch:
                ratios[m].append(of_arch[m])
        milliseconds = "n/a" if math.isnan(step) else f"{step * 1e3:.1f}"
        line = f"| {arch} | {milliseconds} | " + " | ".join(cells[m] for m in methods) + " |"
        if overhead:
            both = "jd-step" in of_arch and "sgd-step" in of_arch
            jd_overheads += [of_arch["jd-step"] / of_arch["sgd-step"]] if both else []
            line += f" {jd_overheads[-1]:.2f}x |" if both else " n/a |"
        print(line)
    means = [_geometric_mean(ratios[m], len(rows)) for m in methods]
    extra = f" {_geometric_mean(jd_overheads, len(rows))} |" if overhead else ""
    print("| geometric mean | | " + " | ".join(means) + " |" + extra)
    print(
        "\nCells: median time / median time of `step` (each method timed against the step in "
        "processes of its own, the median of their ratios), peak RSS growth in a separate "
        "process. Geometric means over the architectures where the method ran (how many, when "
        "not all)."
    )


def _geometric_mean(values: list[float], of: int) -> str:
    if not values:
        return "n/a"
    mean = f"{math.exp(statistics.fmean(math.log(v) for v in values)):.2f}x"
    return mean if len(values) == of else f"{mean} ({len(values)} of {of})"


if __name__ == "__main__":
    main()
