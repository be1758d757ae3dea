"""The docs' links hold: every relative markdown link in README.md, benchmarks/README.md and docs/**/*.md points to a
file that exists, and a `#anchor` to a heading of it; every JSON the benchmarks' results table cites exists under
benchmarks/results/. Lab notes move between files; a link left behind fails here, not in a reader's browser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^ {0,3}```.*?^ {0,3}```[^\n]*$", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """Markdown without code blocks, code spans and HTML comments: what a renderer turns into links."""
    return _CODE.sub("", _COMMENT.sub("", _FENCE.sub("", text)))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if not m:
            continue
        slug = "".join(c for c in m.group(1).lower() if c.isalnum() or c in " -_").replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """`target` for each relative link of `path` whose file or heading does not exist."""
    bad = []
    for target in _LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(target)
    return bad


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files_and_headings(path):
    assert broken_links(path) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## DDP vs FSDP + checkpointing (issue 34)\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](other.md#ddp-vs-fsdp--checkpointing-issue-34) [b](gone.md) [c](other.md#gone)\n"
                   "`[d](gone-in-code.md)`\n```\n[e](gone-in-a-block.md)\n```\n[f](#doc) [g](https://example.org)\n"
                   "# Doc\n")
    assert broken_links(doc) == ["gone.md", "other.md#gone"]


def test_every_json_the_results_table_cites_exists():
    text = (REPO / "benchmarks" / "README.md").read_text()
    cited = set()
    for line in text.split("## Results", 1)[1].splitlines():
        cells = line.strip().strip("|").split(" | ")
        if line.startswith("| ") and len(cells) == 6:
            cited.update(re.findall(r"`([^`]+\.json)`", _COMMENT.sub("", cells[4])))
    assert len(cited) > 20
    missing = sorted(name for name in cited if not (REPO / "benchmarks" / "results" / name).is_file())
    assert missing == []
