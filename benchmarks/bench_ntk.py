"""Times torchgram's empirical NTK (``cross_gramian``) against the two recipes of torch.func's
"Neural Tangent Kernels" tutorial, on the models of ``models.py``.

Run ``python benchmarks/bench_ntk.py`` (every model below), ``--quick`` for a smoke run (one
timed repeat, no memory measurement, the MLP and CNN unless ``--models`` says otherwise),
``--models NAME ...`` for some models. The NTK is that of the per-sample outputs ``f(params, x)
-> [N, C]`` between a batch ``x_a`` (think test) and a batch ``x_b`` (train), every output pair:
``K[n, m, c, d] = <d f(x_a)[n, c] / d params, d f(x_b)[m, d] / d params>``, summed over every
parameter. Methods:

- ``torchgram``: ``torchgram.cross_gramian(f, params, (x_a,), (x_b,), batch_dim=0)``, which
  returns ``[N_a, C, C, N_b]``, permuted (a view) to ``[N_a, N_b, C, C]``.
- ``jacobian-contraction``: the tutorial's first recipe: the per-sample Jacobians of both batches
  (``vmap(jacrev(f_single))``, ``[N, C, *shape]`` per parameter), then for each parameter
  ``einsum("naf,mbf->nmab")``, summed over the parameters.
- ``ntk-vps``: the tutorial's second recipe, NTK-vector products: for each pair of samples,
  ``vjp`` of ``f_single(x_a)`` on each basis vector of the outputs (``vmap`` over the identity),
  then ``jvp`` of ``f_single(x_b)`` on that cotangent; ``vmap(vmap(...))`` over the pairs.

The outputs (``MODELS``): the logits for the classifiers (MLP, CNN, ResNet-18 with GroupNorm,
transformers' BERT-tiny on whole sequences and on right-padded ones with their attention mask);
for the GPT-style LM, whose logits are ``[N, T, vocab]``, the per-sequence mean next-token loss
(``C = 1``: the loss NTK), as the per-token logits would give ``T * vocab`` rows per sample. The
batches: 16 x 32 samples, 4 x 8 for the ResNet and 8 x 16 for the MLP, where ``ntk-vps`` needs
over 20 GiB at 16 x 32 (its ``vmap`` over the pairs expands the weights' cotangents,
``[N_a, C, *shape]``, to ``[N_a, N_b, C, *shape]`` in the ``jvp``: 5.6 GiB at 8 x 16).

Each method runs in fresh processes of its own (``--processes``, 1 by default): built, called
once untimed (torchgram's first call learns fn's shapes and checks two samples), then timed over
``--repeats`` repeats, each the median of as many calls as fit in 0.1 s (at least one); the time
is the median of the repeats (of the processes' medians). Memory is measured in another process
as in ``bench_gramian.py``: one warm-up call, ``malloc_trim``, then the peak resident set growth
of one call. A timing process saves its NTK; the parent reports the largest difference between
the recipes' and torchgram's, relative to the largest entry (float32, the timed batches), and the
same in float64 on 2 x 3 samples (``--check``). A method that fails, is killed (for memory) or
runs past ``--timeout`` is reported with why; each process's data is capped at
``--memory-limit`` (16 GiB), so that a recipe that needs more fails instead of taking the
machine's memory. CPU, 2 threads (``--threads``; 1 where other processes share the cores, see
``bench_gramian.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from bench_gramian import _failure, _peak_rss_bytes, _positive, _reset_peak, _trim
from models import ARCHITECTURES, Setting, missing
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

import torchgram

Tensor = torch.Tensor
METHODS = ("torchgram", "jacobian-contraction", "ntk-vps")
CHECK_SAMPLES = (2, 3)  # N_a, N_b of the float64 check


# The NTK problems ------------------------------------------------------------------------------


@dataclass
class Problem:
    """``out(model, *inputs) -> [N, C]`` on ``model`` (the module or its functional form), and
    the two batches (every tensor with the samples on dim 0)."""

    model: nn.Module
    out: Callable[..., Tensor]
    inputs_a: tuple[Tensor, ...]
    inputs_b: tuple[Tensor, ...]


def _logits(model: Callable[..., Any], x: Tensor) -> Tensor:
    return model(x)  # [N, C]


def _hf_logits(model: Callable[..., Any], ids: Tensor, mask: Tensor) -> Tensor:
    return model(input_ids=ids, attention_mask=mask).logits  # [N, C]


def _hf_logits_unpadded(model: Callable[..., Any], ids: Tensor) -> Tensor:
    return model(input_ids=ids).logits  # [N, C], every token attended


def _lm_loss(model: Callable[..., Any], x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(-1, keepdim=True)


@dataclass(frozen=True)
class Spec:
    """Which architecture of ``models.py``, its output, how many of the setting's inputs it takes,
    and the two batch sizes."""

    arch: str
    out: Callable[..., Tensor]
    inputs: int
    n_a: int
    n_b: int
    what: str


MODELS: dict[str, Spec] = {
    "mlp": Spec("mlp", _logits, 1, 8, 16, "MLP 784-1024-1024-10, logits"),
    "cnn": Spec("cnn", _logits, 1, 16, 32, "CIFAR-like CNN, logits"),
    "resnet18-gn": Spec("resnet18-gn", _logits, 1, 4, 8, "ResNet-18 (GroupNorm), logits"),
    "transformer-lm": Spec(
        "transformer-lm", _lm_loss, 2, 16, 32, "GPT-style LM (2 layers, T=64), loss"
    ),
    "bert-tiny": Spec("bert-tiny", _hf_logits_unpadded, 1, 16, 32, "HF BERT tiny, 3 logits"),
    "bert-tiny-padded": Spec(
        "bert-tiny", _hf_logits, 2, 16, 32, "HF BERT tiny, padded (mask), 3 logits"
    ),
}


def problem(name: str, n_a: int | None = None, n_b: int | None = None) -> Problem:
    """The model and the two batches (``n_a`` and ``n_b`` samples, the spec's by default): the
    setting's inputs, more settings' inputs appended where it holds too few samples."""
    spec = MODELS[name]
    n_a, n_b = n_a or spec.n_a, n_b or spec.n_b
    torch.manual_seed(0)
    setting: Setting = ARCHITECTURES[spec.arch]()
    inputs = setting.inputs[: spec.inputs]
    while inputs[0].shape[0] < n_a + n_b:
        more = ARCHITECTURES[spec.arch]().inputs[: spec.inputs]
        inputs = tuple(torch.cat(pair) for pair in zip(inputs, more, strict=True))
    inputs_a = tuple(t[:n_a] for t in inputs)
    inputs_b = tuple(t[n_a : n_a + n_b] for t in inputs)
    return Problem(setting.model.eval(), spec.out, inputs_a, inputs_b)


def _functional(p: Problem) -> tuple[Callable[..., Tensor], dict[str, Tensor]]:
    """``f(params, *inputs) -> [N, C]`` with the model's parameters taken from ``params``."""
    params = {k: v.detach() for k, v in p.model.named_parameters()}

    def f(params: dict[str, Tensor], *inputs: Tensor) -> Tensor:
        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(p.model, params, args, kwargs)

        return p.out(call, *inputs)

    return f, params


def _single(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The tutorial's ``fnet_single``: f on one sample, ``[C]``."""

    def f_single(params: dict[str, Tensor], *sample: Tensor) -> Tensor:
        return f(params, *(t.unsqueeze(0) for t in sample)).squeeze(0)

    return f_single


# The methods: each returns the NTK as [N_a, N_b, C, C] ------------------------------------------


def _torchgram(p: Problem) -> Callable[[], Tensor]:
    f, params = _functional(p)

    def run() -> Tensor:
        K = torchgram.cross_gramian(f, params, p.inputs_a, p.inputs_b, batch_dim=0)
        return K.permute(0, 3, 1, 2)  # [N_a, C, C, N_b] -> [N_a, N_b, C, C]

    return run


def _jacobian_contraction(p: Problem) -> Callable[[], Tensor]:
    f, params = _functional(p)
    per_sample = vmap(jacrev(_single(f)), in_dims=(None, *(0 for _ in p.inputs_a)))

    def run() -> Tensor:
        jac_a = [j.flatten(2) for j in per_sample(params, *p.inputs_a).values()]  # [N_a, C, P_i]
        jac_b = [j.flatten(2) for j in per_sample(params, *p.inputs_b).values()]
        products = [torch.einsum("naf,mbf->nmab", a, b) for a, b in zip(jac_a, jac_b, strict=True)]
        return torch.stack(products).sum(0)

    return run


def _ntk_vps(p: Problem) -> Callable[[], Tensor]:
    f, params = _functional(p)
    f_single = _single(f)

    def of_pair(sample_a: tuple[Tensor, ...], sample_b: tuple[Tensor, ...]) -> Tensor:
        out, vjp_fn = vjp(lambda q: f_single(q, *sample_a), params)

        def column(vec: Tensor) -> Tensor:  # J_b J_aᵀ vec
            cotangents = vjp_fn(vec)
            return jvp(lambda q: f_single(q, *sample_b), (params,), cotangents)[1]

        basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device).view(out.numel(), -1)
        return vmap(column)(basis)  # [C, C]: row c is J_b J_aᵀ e_c, i.e. <J_a[c], J_b[d]>

    pairs = vmap(vmap(of_pair, in_dims=(None, 0)), in_dims=(0, None))
    return lambda: pairs(p.inputs_a, p.inputs_b)


MAKERS: dict[str, Callable[[Problem], Callable[[], Tensor]]] = {
    "torchgram": _torchgram,
    "jacobian-contraction": _jacobian_contraction,
    "ntk-vps": _ntk_vps,
}


# Workers, each in a process of its own ----------------------------------------------------------


def _prepared(name: str, method: str) -> tuple[Problem, Callable[[], Tensor] | None, str | None]:
    """The problem and the method's run, called once (the first call: probes, checks), or the
    failure (``bench_gramian._failure``'s text)."""
    p = problem(name)
    try:
        run = MAKERS[method](p)
        run()
    except Exception as error:  # a method that cannot run here is a result, not a crash
        return p, None, _why(error)
    gc.collect()
    return p, run, None


def time_method(name: str, method: str, repeats: int, save: str, budget: float = 0.1) -> None:
    """Print ``{"times": [seconds per repeat], ...}`` of ``method`` and save its NTK to ``save``.

    Each repeat is the median of as many calls in a row as fit in ``budget`` seconds (at least
    one): one call of a few milliseconds is at the mercy of the machine.
    """
    p, run, failed = _prepared(name, method)
    if run is None:
        print(json.dumps({"failed": failed}))
        return
    start = time.perf_counter()
    K = run()
    calls = max(1, min(50, int(budget / (time.perf_counter() - start))))
    times = []
    for _ in range(repeats):
        timed = []
        for _ in range(calls):
            start = time.perf_counter()
            run()
            timed.append(time.perf_counter() - start)
        times.append(statistics.median(timed))
    torch.save(K.detach().float(), save)
    params = sum(t.numel() for t in p.model.parameters())
    shape = [p.inputs_a[0].shape[0], p.inputs_b[0].shape[0], K.shape[-1]]
    print(json.dumps({"times": times, "params": params, "shape": shape}))


def measure_memory(name: str, method: str) -> None:
    """Print the peak RSS growth (bytes) of one call of ``method``, after a warm-up call (see
    ``bench_gramian.measure_memory``)."""
    _, run, failed = _prepared(name, method)
    if run is None:
        print(json.dumps({"failed": failed}))
        return
    gc.collect()
    _trim()
    baseline = _reset_peak()
    run()
    print(json.dumps({"peak_bytes": _peak_rss_bytes() - baseline}))


def check_float64(name: str) -> None:
    """Print each method's largest difference from torchgram, relative to the largest entry, in
    float64 on ``CHECK_SAMPLES`` samples (or the failure)."""
    p = problem(name, *CHECK_SAMPLES)
    p.model.double()
    cast = lambda ts: tuple(t.double() if t.is_floating_point() else t for t in ts)  # noqa: E731
    p.inputs_a, p.inputs_b = cast(p.inputs_a), cast(p.inputs_b)
    results: dict[str, Any] = {}
    for method in METHODS:
        try:
            results[method] = MAKERS[method](p)()
        except Exception as error:
            results[method] = _why(error)
        gc.collect()
    print(json.dumps({m: _difference(results[m], results["torchgram"]) for m in METHODS[1:]}))


def _why(error: BaseException) -> str:
    """``bench_gramian._failure``'s text, or that the call needed more than ``--memory-limit``."""
    if "can't allocate memory" in str(error):
        limit = resource.getrlimit(resource.RLIMIT_DATA)[0] / 2**30
        return f"fails (out of memory: over the --memory-limit of {limit:.0f} GiB)"
    return _failure(error)


def _difference(K: Tensor | str, reference: Tensor | str) -> float | str:
    """``max |K - reference| / max |reference|``, or why there is none."""
    if isinstance(K, str):
        return K
    if isinstance(reference, str):
        return "no torchgram result"
    return ((K - reference).abs().max() / reference.abs().max()).item()


# The parent -------------------------------------------------------------------------------------


def _worker(args: list[str], options: argparse.Namespace, memory: bool = False) -> dict[str, Any]:
    """Run this script with ``args`` in a fresh process, its data segment capped at
    ``--memory-limit`` (an allocation beyond it raises, instead of the machine swapping or
    killing a bystander); its last line of JSON, or the failure."""
    command = [sys.executable, __file__, *args, "--threads", str(options.threads)]
    env = dict(os.environ)
    if memory:  # as in bench_gramian: blocks of 64 KiB and more straight from and to the OS
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    limit = int(options.memory_limit * 2**30)
    timeout = options.timeout
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            env=env,
            timeout=timeout,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)),
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"fails (ran past --timeout {timeout:.0f} s)"}
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1][:80]
        killed = " (killed: out of memory?)" if result.returncode == -9 else ""
        return {"failed": f"fails (process exited with {result.returncode}{killed}: {last})"}
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass
class Result:
    seconds: float | None = None
    memory: float | None = None
    failed: str | None = None
    difference: float | str | None = None


def _run_model(name: str, args: argparse.Namespace) -> tuple[dict[str, Result], dict[str, Any]]:
    """Every method on one model, printed as it comes; and what the workers said of the model."""
    results = {m: Result() for m in args.methods}
    facts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        saved = {m: os.path.join(folder, f"{m}.pt") for m in args.methods}
        for m in args.methods:
            medians = []
            for _ in range(args.processes):
                timed = _worker(
                    ["--time", name, m, "--repeats", str(args.repeats), "--save", saved[m]], args
                )
                if "failed" in timed:
                    results[m].failed = timed["failed"]
                    break
                medians.append(statistics.median(timed["times"]))
                facts.update(params=timed["params"], shape=timed["shape"])
            if medians:
                results[m].seconds = statistics.median(medians)
            if results[m].failed is None and not args.quick:
                used = _worker(["--measure-memory", name, m], args, memory=True)
                results[m].memory = used.get("peak_bytes")
                if "failed" in used:
                    print(f"  {name} {m}: memory not measured: {used['failed']}", flush=True)
            load = "/".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"  {name} {m}: {_cell(results[m])} [load average {load}]", flush=True)
        reference = saved["torchgram"] if "torchgram" in args.methods else None
        for m in args.methods:
            if m != "torchgram" and reference and results[m].seconds is not None:
                if results["torchgram"].seconds is not None:
                    K, R = torch.load(saved[m]), torch.load(reference)
                    results[m].difference = _difference(K, R)
    if not args.quick or args.check:
        facts["float64"] = _worker(["--check-one", name], args)
    return results, facts


def _cell(result: Result) -> str:
    if result.failed is not None:
        return result.failed
    assert result.seconds is not None
    text = _duration(result.seconds)
    return text if result.memory is None else f"{text}, {result.memory / 2**20:.0f} MiB"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _print_table(
    rows: list[tuple[str, dict[str, Result], dict[str, Any]]], methods: list[str]
) -> None:
    """One row per model: each method's time and memory, each recipe's ratio to torchgram and its
    difference from torchgram in float32 (the timed batches) and float64 (2 x 3 samples)."""
    recipes = [m for m in methods if m != "torchgram"]
    header = ["model", "N_a x N_b, C, params", *methods]
    header += [f"{m} / torchgram" for m in recipes] + ["max rel. difference f32 / f64"]
    print("\n| " + " | ".join(header) + " |")
    print("|---|---|" + "---:|" * (len(header) - 2))
    for name, results, facts in rows:
        shape = facts.get("shape")
        size = "n/a" if shape is None else f"{shape[0]} x {shape[1]}, {shape[2]}, "
        size += f"{facts['params'] / 1e6:.2f}M" if "params" in facts else ""
        cells = [MODELS[name].what, size, *(_cell(results[m]) for m in methods)]
        ours = results.get("torchgram", Result()).seconds
        for m in recipes:
            theirs = results[m].seconds
            cells.append(f"{theirs / ours:.1f}x" if ours and theirs else "n/a")
        differences = []
        for m in recipes:
            f32, f64 = results[m].difference, facts.get("float64", {}).get(m)
            ran = results[m].failed is None
            differences.append(f"{_number(f32)} / {_number(f64)}" if ran else "n/a")
        cells.append("; ".join(differences) or "n/a")
        print("| " + " | ".join(cells) + " |")
    print(
        "\nTimes: median over repeats, each method in a fresh process; memory: peak RSS growth "
        "of one call in another process. Differences: max |K - K_torchgram| / max |K_torchgram|, "
        f"per recipe in the order of the columns ({', '.join(recipes)})."
    )


def _number(value: float | str | None) -> str:
    if isinstance(value, float):
        return f"{value:.0e}"
    return "n/a" if value is None else "fails"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="MLP and CNN, one repeat, no memory, no check"
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--repeats", type=_positive, default=3, help="timed repeats per process")
    parser.add_argument(
        "--processes", type=_positive, default=1, help="timing processes per method and model"
    )
    parser.add_argument("--threads", type=_positive, default=2)
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per process before it fails"
    )
    parser.add_argument(
        "--memory-limit", type=float, default=16.0, help="GiB of data per process (RLIMIT_DATA)"
    )
    parser.add_argument("--check", action="store_true", help="the float64 check in --quick too")
    parser.add_argument("--time", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--measure-memory", nargs=2, metavar=("MODEL", "METHOD"))
    parser.add_argument("--check-one", dest="check_model", metavar="MODEL", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    if args.time:
        time_method(*args.time, args.repeats, args.save)
        return
    if args.measure_memory:
        measure_memory(*args.measure_memory)
        return
    if args.check_model:
        check_float64(args.check_model)
        return
    if args.quick:
        args.repeats, args.processes = 1, 1
    names = args.models or (["mlp", "cnn"] if args.quick else list(MODELS))
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.threads} threads, {os.cpu_count()} cores, load average {load}", flush=True)
    rows = []
    for name in names:
        reason = missing(MODELS[name].arch)
        if reason:
            print(f"note: skipping {name}: {reason}", flush=True)
            continue
        rows.append((name, *_run_model(name, args)))
    _print_table(rows, args.methods)


if __name__ == "__main__":
    main()
