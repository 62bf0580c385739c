"""Sessions: tests, lint, typecheck, docs, demo, bench. ``nox -l`` lists them.

Every session installs torch 2.13.0 (the CPU build lies on this kind of machine; elsewhere pip
takes PyPI's build) so that an unpinned ``torch`` never pulls a multi-GB build.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "docs"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
LINT = ["ruff==0.17.6"]
TYPES = ["mypy==2.4.1"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, doctests of the package included."""
    session.install(TORCH, "-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: formatting and lint rules."""
    session.install(*LINT)
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the package."""
    session.install(TORCH, "-e", ".", *TYPES)
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site, failing on any warning or markup shown as text."""
    session.install(TORCH, "-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")
    session.run("python", "docs/check_site.py", "site")  # no markup shown as text


@nox.session
def demo(session: nox.Session) -> None:
    """The README's demo."""
    session.install(TORCH, "-e", ".[demo]")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks (long: minutes)."""
    session.install(TORCH, "-e", ".[bench]")
    session.run("python", "benchmarks/bench_gramian.py", *session.posargs)
