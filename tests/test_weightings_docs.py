"""The docs name every weighting of ``torchgram.weightings.__all__``, so none can be left out.

``docs/weightings.md`` renders the reference of every public name (``:::``) and has a row for
every weighting in its two tables; ``docs/api.md`` lists the weightings too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_weightings_properties import NAMES

from torchgram import weightings as W

DOCS = Path(__file__).parents[1] / "docs"
PAGE = (DOCS / "weightings.md").read_text(encoding="utf-8")


def _section(text: str, title: str) -> str:
    """The text of the section ``## title``, up to the next ``##`` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section '## {title}'"
    return match.group(1)


def test_the_reference_renders_every_public_name_once() -> None:
    rendered = re.findall(r"^::: torchgram\.weightings\.(\w+)$", PAGE, re.M)
    assert sorted(rendered) == sorted(W.__all__)


@pytest.mark.parametrize("name", NAMES)
def test_the_tables_have_a_row_for_every_weighting(name: str) -> None:
    assert f"`{name}(G" in _section(PAGE, "The weightings")
    assert re.search(rf"^\|[^|]*`{name}`", _section(PAGE, "Degenerate Gramians"), re.M)


@pytest.mark.parametrize("name", NAMES)
def test_the_api_page_lists_every_weighting(name: str) -> None:
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    assert f"`{name}`" in _section(api, "Weightings")
