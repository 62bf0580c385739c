"""Mutation check: does the test suite notice small bugs in torchgram? (On demand, not in CI.)

Each mutant is one small change inside one function of ``src/torchgram`` (a dropped transpose, a
tolerance 100 times looser, a skipped check, two cotangents swapped, ...). The script copies
``src/`` to a temporary directory, applies one mutant at a time to the copy, runs the test files
relevant to it against the copy (``PYTHONPATH`` first, so the copy shadows the installed
package), and prints which mutants the tests kill, and the first test that killed each.

A mutant names its function (``Class.method``, ``outer.inner`` or ``function``), found with the
``ast`` module, and the exact text to change inside that function: line numbers play no part,
so the mutants survive edits elsewhere in the file. Where the function or the text is gone (a
refactor), the mutant is reported ``stale`` instead of being run: update its text.

Before the mutants, the unmutated copy runs every test file used below once; tests that fail
there (known failures) are deselected from the mutants' runs, and listed.

Run: python benchmarks/mutation_check.py [--jobs 2] [--only NAME ...] [--all] [--list]
(``--all``: run each mutant's tests to the end and count every test that fails, instead of
stopping at the first; slower.)
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "src/torchgram"


@dataclasses.dataclass(frozen=True)
class Mutant:
    """``old`` -> ``new`` (exactly once) inside ``function`` of ``PACKAGE/file``."""

    name: str
    file: str
    function: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str = ""


LINEAR = ("tests/test_rules_linear.py", "tests/test_assemble.py", "tests/test_properties.py")
CONV = ("tests/test_rules_conv.py",)
SAMPLES = (
    "tests/test_samples.py",
    "tests/test_sample_tolerance.py",
    "tests/test_run.py",
    "tests/test_batched.py",
)
BATCHED = ("tests/test_batched.py", "tests/test_run.py", "tests/test_samples.py")
NORM = ("tests/test_batched.py", "tests/test_rules_norm.py", "tests/test_parameter_taps.py")
COMPOSE = ("tests/test_reverse.py", "tests/test_compose.py", "tests/test_vjp.py")
WEIGHTINGS = (
    "tests/test_weightings_degenerate.py",
    "tests/test_weightings_float32.py",
    "tests/test_weightings_properties.py",
    "tests/test_weightings_torchjd.py",
)
EXAMPLES = ("tests/test_examples.py",)

MUTANTS = [
    # the rules
    Mutant(
        "linear: drop the bias", "_ops/linear.py", "linear_rule",
        "    if bias is not None:\n        out.append(", "    if False:\n        out.append(",
        LINEAR + EXAMPLES,
    ),
    Mutant(
        "matmul: drop the transpose of x @ W", "_ops/linear.py", "matmul_rule",
        "Linear(transposed_region(right),", "Linear(transposed_region(right).T,",
        LINEAR, "x @ W's factor on W's region, not W.T's",
    ),
    Mutant(
        "einsum: swap the row and sample axes of the cotangent", "_ops/linear.py",
        "einsum_rule", "[row + sample + output]", "[sample + row + output]", LINEAR,
    ),
    Mutant(
        "conv: 'same' padding's odd element on the left", "_ops/conv.py", "_padding",
        "(total // 2, total - total // 2)", "(total - total // 2, total // 2)", CONV,
    ),
    Mutant(
        "conv: ignore the dilation", "_ops/conv.py", "conv_rule",
        'dilation = _per_dim(argument(args, kwargs, 5, "dilation") or 1, n)',
        "dilation = _per_dim(1, n)", CONV,
    ),
    Mutant(
        "embedding: ignore padding_idx", "_ops/embedding.py", "embedding_rule",
        "if padding_idx is not None and padding_idx >= 0:", "if False:",
        ("tests/test_rules_embedding.py",),
    ),
    Mutant(
        "layer_norm: ignore eps", "_ops/norm.py", "layer_norm_rule",
        "(1e-5 if eps is None else eps)", "1e-5", NORM,
    ),
    Mutant(
        "layer_norm: drop the bias", "_ops/norm.py", "layer_norm_rule",
        "    if bias is not None:\n        out.append(", "    if False:\n        out.append(",
        NORM,
    ),
    # the factors
    Mutant(
        "ghost (one token): drop the bias's column of ones", "_factors.py", "ghost_gramian",
        "aa = a @ a.T + 1 if ones else a @ a.T", "aa = a @ a.T", LINEAR + EXAMPLES,
    ),
    Mutant(
        "ghost (tokens): drop the bias's column of ones", "_factors.py",
        "ghost_gramian.similarity", "return S + 1 if ones else S", "return S", LINEAR,
    ),
    Mutant(
        "ghost blocks: mirrored block not transposed", "_factors.py", "ghost_from_similarity",
        "blocks[j, i].permute(2, 3, 0, 1)", "blocks[j, i]", LINEAR + CONV + COMPOSE,
        "only where max_chunk_bytes splits the samples",
    ),
    Mutant(
        "materialised: off-by-one in the chunks of d_out", "_factors.py",
        "materialised_gramian", "D[..., start : start + step]", "D[..., start : start + step - 1]",
        LINEAR + CONV,
    ),
    Mutant(
        "dense Gramian: drop the columns after the last slice", "_factors.py", "dense_gramian",
        "G = G + rest @ rest.T", "G = G", LINEAR + CONV + ("tests/test_rules_embedding.py",),
        "only for <= 128 rows of >= 32768 columns that are not a multiple of 8192",
    ),
    Mutant(
        "Linear.weighted: weights of the samples reversed", "_factors.py", "Linear.weighted",
        'torch.einsum("kb,kbte->bte", weights, self.D)',
        'torch.einsum("kb,kbte->bte", weights.flip(1), self.D)',
        ("tests/test_vjp.py", *LINEAR, *EXAMPLES),
    ),
    # the assembly
    Mutant(
        "assembly: overlapping regions taken as disjoint", "_assemble.py", "_leaf_gramian",
        "if int(counts.max()) <= 1:", "if int(counts.max()) <= 2:", LINEAR,
    ),
    Mutant(
        "assembly: bias counted twice (with its weight and alone)", "_assemble.py", "_with_bias",
        "        del by_leaf[weight.bias]", "        pass", LINEAR + EXAMPLES,
    ),
    Mutant(
        "assembly: shared heads drop their biases", "_assemble.py", "_shared_gramian",
        "ones=group[0][1])", "ones=False)", LINEAR + EXAMPLES,
    ),
    Mutant(
        "assembly: a transposed use of a region not transposed", "_assemble.py",
        "group_by_region", "group.append(factor.transposed(positions(index, shape)))",
        "group.append(factor)", (*LINEAR, "tests/test_tape.py"),
    ),
    # the sample check
    Mutant(
        "sample check: tolerance 100x looser", "_samples.py", "_difference",
        "if gap <= _precision(b) ** (2 / 3) * max(scale, 1.0):",
        "if gap <= 100 * _precision(b) ** (2 / 3) * max(scale, 1.0):", SAMPLES,
    ),
    Mutant(
        "sample check: tolerance 100x tighter", "_samples.py", "_difference",
        "if gap <= _precision(b) ** (2 / 3) * max(scale, 1.0):",
        "if gap <= 0.01 * _precision(b) ** (2 / 3) * max(scale, 1.0):",
        (*SAMPLES, "tests/test_memo.py"),
    ),
    Mutant(
        "sample check: skipped", "_samples.py", "compare",
        "what = _difference(batched.detach(), per_sample.detach())", "what = None", SAMPLES,
    ),
    Mutant(
        "sample check: NaN in one run only not told", "_samples.py", "_difference",
        "if bool(beneath_transforms(a.isnan() != b.isnan()).any()):", "if False:", SAMPLES,
    ),
    Mutant(
        "sample check: autocast's eps ignored", "_samples.py", "_precision",
        "eps = max(eps, torch.finfo(torch.get_autocast_dtype(device)).eps)", "eps = eps",
        ("tests/test_memo.py", *SAMPLES),
    ),
    # the runs
    Mutant(
        "batched run: Gramians not compared with the vmapped run's", "_run.py", "_same_rows",
        "if not agree(batched.gramian(), reference.gramian()):", "if False:", BATCHED,
    ),
    Mutant(
        "first call: probe's output not compared", "_run.py", "_first_per_sample",
        "if options.check_samples and not (probed.random or result.random):", "if False:",
        ("tests/test_samples.py", "tests/test_run.py", "tests/test_memo.py"),
    ),
    Mutant(
        "looped run: every run on sample 0", "_per_sample.py", "_sample",
        "x.narrow(d, i, 1)", "x.narrow(d, 0, 1)",
        ("tests/test_run.py", "tests/test_transform.py", "tests/test_errors.py"),
    ),
    Mutant(
        "batch_dim: output merged at dim 0", "_per_sample.py", "_merge",
        "stacked.movedim(0, b)", "stacked.movedim(0, 0)",
        ("tests/test_transform.py", "tests/test_run.py", *BATCHED),
    ),
    Mutant(
        "whole run: row-by-row pull-back not forced for weighted norms", "_whole.py",
        "pull_rows", "    if forced:\n", "    if False:\n", COMPOSE + NORM,
        "a torch 2.13 bug: wrong derivatives of layer_norm's Gramian under grad",
    ),
    # the reverse pass and the tape
    Mutant(
        "pull-back: the one-hot rows in reverse order", "_reverse.py", "pull_back",
        "eye = torch.eye(rows, dtype=out.dtype, device=out.device).reshape(rows, *per_sample)",
        "eye = torch.eye(rows, dtype=out.dtype, device=out.device).flip(0)"
        ".reshape(rows, *per_sample)",
        ("tests/test_reverse.py", *LINEAR, "tests/test_transform.py"),
    ),
    Mutant(
        "pull-back row by row: rows stacked in reverse", "_reverse.py", "_row_by_row",
        "else torch.stack(parts)", "else torch.stack(parts[::-1])", COMPOSE + NORM,
    ),
    Mutant(
        "reverse: Gramian not differentiable through a parameter", "_reverse.py",
        "_needs_grad_beyond", "return True  # such a leaf itself", "return False",
        COMPOSE,
    ),
    Mutant(
        "tape: the chunks of a parameter swap their regions", "_tape.py", "Tape._follow_view",
        "index_outs = optree.tree_leaves(index_out)",
        "index_outs = optree.tree_leaves(index_out)[::-1]",
        ("tests/test_tape.py", *LINEAR, "tests/test_rules_conv.py"),
    ),
    # the weightings
    Mutant(
        "dual cone: float32 solver tolerance 10x looser", "weightings/_dual_cone.py",
        "_default_tol", "else 1e-5", "else 1e-4", WEIGHTINGS,
    ),
    Mutant(
        "dual cone: regularisation 10x smaller", "weightings/_dual_cone.py",
        "_normalize_regularize", "reg_eps * torch.eye", "0.1 * reg_eps * torch.eye", WEIGHTINGS,
    ),
    Mutant(
        "upgrad: mean of the projections instead of their sum", "weightings/_upgrad.py",
        "upgrad", "V.sum(dim=0)", "V.mean(dim=0)", WEIGHTINGS,
    ),
    Mutant(
        "mgda: stop after the first step", "weightings/_mgda.py", "mgda",
        "done = done | (gamma < epsilon)", "done = done | (gamma >= 0)", WEIGHTINGS,
    ),
    Mutant(
        "pcgrad: project where rows agree", "weightings/_pcgrad.py", "pcgrad.project",
        "conflict = (inner < 0) & projectable[:, t]",
        "conflict = (inner > 0) & projectable[:, t]", WEIGHTINGS,
    ),
]  # fmt: skip


def _function(tree: ast.Module, qualified: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The function ``a.b.c`` (classes and functions nested in each other)."""
    scope: list[ast.stmt] = tree.body
    found: ast.AST | None = None
    for part in qualified.split("."):
        found = next(
            (
                node
                for node in scope
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and node.name == part
            ),
            None,
        )
        if found is None:
            return None
        scope = found.body  # type: ignore[attr-defined]
    return found if isinstance(found, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def mutate(source: str, mutant: Mutant) -> tuple[str | None, str]:
    """The mutated source, or None and why it cannot be made (stale)."""
    node = _function(ast.parse(source), mutant.function)
    if node is None:
        return None, f"no function {mutant.function}"
    lines = source.splitlines(keepends=True)
    start, end = node.lineno - 1, node.end_lineno or node.lineno
    body = "".join(lines[start:end])
    count = body.count(mutant.old)
    if count != 1:
        return None, f"{count} occurrences of the text in {mutant.function}"
    mutated = "".join(lines[:start]) + body.replace(mutant.old, mutant.new) + "".join(lines[end:])
    try:
        ast.parse(mutated)
    except SyntaxError as error:
        return None, f"the mutant does not parse: {error}"
    return mutated, ""


@dataclasses.dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed, survived, stale, timeout
    by: str = ""
    seconds: float = 0.0
    failures: int = 0


def _environment(copy: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into the repository's tests/
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


def _pytest(
    copy: Path,
    tests: tuple[str, ...],
    deselect: list[str],
    stop: bool,
    threads: int,
    timeout: float,
) -> tuple[int | None, list[str], str]:
    """Run ``tests`` against the copy; returns the exit code (None: timed out), the failing
    test ids in order, and the end of the output."""
    command = [
        sys.executable, "-m", "pytest", *(str(ROOT / t) for t in tests), "-q", "-rfE",
        "-p", "no:cacheprovider", "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
        "-W", "ignore::DeprecationWarning",
    ]  # fmt: skip
    if stop:
        command.append("-x")
    for test in deselect:
        command += ["--deselect", test]
    try:
        run = subprocess.run(
            command,
            cwd=copy,  # hypothesis's example database and the like go there
            env=_environment(copy, threads),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, [], ""
    output = run.stdout + run.stderr
    # "FAILED <id> - <message>"; an id may hold spaces (parametrize ids)
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, flags=re.MULTILINE)
    return run.returncode, [_rooted(test, copy) for test in failed], output[-3000:]


def _rooted(test: str, cwd: Path) -> str:
    """A test id printed relative to ``cwd`` -> relative to the repository (``tests/...``)."""
    path, _, rest = test.partition("::")
    relative = os.path.relpath(os.path.normpath(cwd / path), ROOT)
    return f"{relative}::{rest}" if rest else relative


def _short(test: str) -> str:
    return test.removeprefix("tests/")


def run_mutant(
    mutant: Mutant, copy: Path, deselect: list[str], stop: bool, threads: int, timeout: float
) -> Outcome:
    target = copy / PACKAGE / mutant.file
    original = (ROOT / PACKAGE / mutant.file).read_text()
    mutated, why = mutate(original, mutant)
    if mutated is None:
        return Outcome(mutant, "stale", why)
    target.write_text(mutated)
    start = time.perf_counter()
    try:
        code, failed, output = _pytest(copy, mutant.tests, deselect, stop, threads, timeout)
    finally:
        target.write_text(original)
    seconds = time.perf_counter() - start
    if code is None:
        return Outcome(mutant, "timeout", f"over {timeout:.0f} s", seconds)
    if code == 0:
        return Outcome(mutant, "survived", "", seconds)
    if failed:
        return Outcome(mutant, "killed", _short(failed[0]), seconds, len(failed))
    last = output.strip().splitlines()[-1] if output.strip() else f"exit code {code}"
    return Outcome(mutant, "killed", f"pytest exit {code}: {last[:80]}", seconds, 1)


def baseline(copy: Path, tests: list[str], threads: int, timeout: float) -> list[str]:
    """The tests that fail on the unmutated copy."""
    code, failed, output = _pytest(copy, tuple(tests), [], False, threads, timeout)
    if code is None:
        sys.exit(f"the unmutated run took over {timeout:.0f} s")
    if code not in (0, 1):
        sys.exit(f"the unmutated run failed (exit code {code}):\n{output}")
    return failed


def table(outcomes: list[Outcome], counted: bool) -> str:
    rows = [("mutant", "file:function", "killed", "by" + (" (failures)" if counted else ""))]
    for o in outcomes:
        killed = {"killed": "yes", "survived": "NO", "stale": "stale", "timeout": "timeout"}
        by = o.by + (f" ({o.failures})" if counted and o.status == "killed" else "")
        rows.append((o.mutant.name, f"{o.mutant.file}:{o.mutant.function}", killed[o.status], by))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--only", nargs="*", help="run the mutants whose name contains these")
    parser.add_argument("--all", action="store_true", help="count every failing test (no -x)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = parser.parse_args()
    mutants = [
        m for m in MUTANTS if not args.only or any(s.lower() in m.name.lower() for s in args.only)
    ]
    if args.list:
        for m in mutants:
            print(f"{m.name}  [{m.file}:{m.function}]  tests: {' '.join(m.tests)}")
        return
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with tempfile.TemporaryDirectory(prefix="torchgram-mutants-") as tmp:
        copies = [Path(tmp) / f"copy{i}" for i in range(args.jobs)]
        for copy in copies:
            shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("*.pyc"))
        tests = sorted({t for m in mutants for t in m.tests})
        start = time.perf_counter()
        known = baseline(copies[0], tests, (os.cpu_count() or 1), args.timeout)
        print(f"unmutated: {len(tests)} test files in {time.perf_counter() - start:.0f} s", end="")
        print(f"; {len(known)} known failures, deselected below:" if known else "; all pass")
        for test in known:
            print(f"  {_short(test)}")
        free: queue.Queue[Path] = queue.Queue()
        for copy in copies:
            free.put(copy)

        def one(mutant: Mutant) -> Outcome:
            copy = free.get()
            try:
                outcome = run_mutant(mutant, copy, known, not args.all, threads, args.timeout)
            finally:
                free.put(copy)
            print(f"  {outcome.status:8s} {outcome.seconds:6.1f} s  {mutant.name}", flush=True)
            return outcome

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            outcomes = list(pool.map(one, mutants))
    print()
    print(table(outcomes, args.all))
    killed = sum(o.status == "killed" for o in outcomes)
    ran = sum(o.status in ("killed", "survived", "timeout") for o in outcomes)
    print(f"\n{killed} of {ran} mutants killed ({len(outcomes) - ran} stale), "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
