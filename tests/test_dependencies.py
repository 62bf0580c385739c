"""The test extra of ``pyproject.toml`` is installed, extras of extras included: a missing test
dependency fails the suite here, where the tests that need it would skip
(``pytest.importorskip``) or fail far from the cause."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency there
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _test_extra() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(line) for line in project["optional-dependencies"]["test"]]


def _installed(requirement: Requirement) -> str:
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{requirement} is not installed: pip install -e '.[test]'", pytrace=False)
    assert requirement.specifier.contains(version, prereleases=True), (
        f"{requirement.name} {version} is installed, the test extra asks for {requirement}"
    )
    return version


@pytest.mark.parametrize("requirement", _test_extra(), ids=str)
def test_the_test_extra_is_installed(requirement: Requirement) -> None:
    _installed(requirement)
    for extra in sorted(requirement.extras):  # e.g. torchjd[full]: the solvers it compares with
        needed = [
            Requirement(line)
            for line in importlib.metadata.requires(requirement.name) or []
            if Requirement(line).marker is not None
            and Requirement(line).marker.evaluate({"extra": extra})  # type: ignore[union-attr]
        ]
        assert needed, f"{requirement.name} has no extra {extra!r}"
        for dependency in needed:
            _installed(dependency)
