"""Every relative link in README.md and docs/ reaches a file of the repository, and every #anchor a heading
of the page it names (as GitHub makes anchors from headings), so a renamed section or a moved file is
found here rather than by a reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not an image
FENCE = re.compile(r"```.*?```", re.S)  # links and headings inside code blocks are code


def _slug(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"#+ (.*)", line):
            slug = _slug(m.group(1))
            found.add(slug if slug not in counts else f"{slug}-{counts[slug]}")  # GitHub's -1, -2, ...
            counts[slug] = counts.get(slug, 0) + 1
    return found


def _broken(page: Path) -> tuple[int, list[str]]:
    checked, broken = 0, []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        checked += 1
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no heading makes #{anchor})")
    return checked, broken


def test_the_anchor_of_a_heading_is_githubs():
    assert (
        _slug("Causal language models (SmolLM2, LLaMA family)")
        == "causal-language-models-smollm2-llama-family"
    )
    assert _slug("Each node's optimizer (`train.optimizer`)") == "each-nodes-optimizer-trainoptimizer"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    _, broken = _broken(page)
    assert not broken, f"{page.name}: {broken}"


def test_the_links_are_really_checked():
    assert sum(_broken(page)[0] for page in PAGES) >= 60  # 76 today; README's contents line links 13
