"""The README and docs/: every relative link reaches a file, and every #anchor a heading."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    found = set()
    for title in re.findall(r"(?m)^#{1,4} (.+)$", page.read_text()):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_every_link_resolves() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"(?s)```.*?```", "", page.read_text())  # not inside code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_a_landing_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 16_000  # what, why, quick start, links: the rest is in docs/
    for command in (
        "pip install . && thriftgate serve",
        "pip install -e '.[test]' && python -m pytest",
    ):
        assert command in readme
    assert "thriftgate doctor" in readme and "/readyz" in readme  # a verify step
    for page in (
        "guide",
        "configuration",
        "operations",
        "deployment",
        "security",
        "troubleshooting",
    ):
        assert f"docs/{page}.md" in readme
