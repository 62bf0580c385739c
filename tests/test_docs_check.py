"""The docs check (docs/check_site.py) finds markup that the site shows as text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "check_site", Path(__file__).parents[1] / "docs" / "check_site.py"
)
check_site = importlib.util.module_from_spec(_SPEC)  # type: ignore[arg-type]
_SPEC.loader.exec_module(check_site)  # type: ignore[union-attr]


def _problems(tmp_path: Path, html: str) -> list[str]:
    page = tmp_path / "page.html"
    page.write_text(html, encoding="utf-8")
    return check_site.problems(page)


def test_markup_shown_as_text_is_found(tmp_path: Path) -> None:
    quoted = "<blockquote><p>&gt;&gt;&gt; import torch</p></blockquote>"
    assert "doctest prompt" in _problems(tmp_path, quoted)[0]
    assert "Sphinx role" in _problems(tmp_path, "<p>See :func:`gramian_of`.</p>")[0]
    assert "literal marker" in _problems(tmp_path, "<p>the Gramian::</p>")[0]


def test_code_blocks_pass(tmp_path: Path) -> None:
    html = "<pre><code>&gt;&gt;&gt; G = gramian(fn, p, x)  # :func:`x`</code></pre><p>S[::-1]</p>"
    assert _problems(tmp_path, html) == []
