"""The documentation's relative links (markdown links and images) point at files of the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "docs" / "runs").glob("*.md"))]
# [text](target) and ![alt](target); the target up to the first space, ')' or '#'
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s#]+)[^)]*\)")


def relative_links(text):
    """The link targets of ``text`` that name a file of the repository (no scheme, no anchor-only)."""
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_relative_links_finds_links_and_images_but_not_urls():
    text = ("see [a](docs/a.md), ![plot](b.png) and [c](runs/c.md#top) "
            "but not [web](https://example.org/x.md) or [mail](mailto:x@y)")
    assert relative_links(text) == ["docs/a.md", "b.png", "runs/c.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = [t for t in relative_links(doc.read_text()) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"
