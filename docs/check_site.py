"""Fail when the built site shows what a docstring meant as markup: a doctest prompt (``>>>``)
outside a code block, or a Sphinx role (``:func:`x```) or literal marker (``::``) as text.

Run after ``mkdocs build``: ``python docs/check_site.py site`` (the nox ``docs`` session does).
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj|ref):`")
LITERAL = re.compile(r"\S::\s*$")


class _Text(HTMLParser):
    """Collects the text outside ``<pre>`` and ``<code>``, one string per text node."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("pre", "code", "script", "style"):
            self.depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "code", "script", "style"):
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth == 0 and data.strip():
            self.texts.append(data)


def problems(page: Path) -> list[str]:
    """What ``page`` shows as text that was meant as markup."""
    parser = _Text()
    parser.feed(page.read_text(encoding="utf-8"))
    found = []
    for text in parser.texts:
        if ">>>" in text:
            found.append(f"a doctest prompt outside a code block: {text.strip()[:80]!r}")
        if ROLE.search(text):
            found.append(f"a Sphinx role shown as text: {text.strip()[:80]!r}")
        if LITERAL.search(text):
            found.append(f"a reST literal marker shown as text: {text.strip()[:80]!r}")
    return found


def main(site: str) -> int:
    failures = 0
    for page in sorted(Path(site).rglob("*.html")):
        for problem in problems(page):
            print(f"{page}: {problem}")
            failures += 1
    if failures:
        print(f"{failures} rendering problem(s): fix the docstrings or pages above.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "site"))
