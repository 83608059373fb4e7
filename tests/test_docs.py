"""The docs a newcomer reads: README.md (the front door, at most 250 lines) and docs/**/*.md.

Every relative link (``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)``, images too)
points at a file that exists, and an anchor into a markdown file names one of its headings (GitHub's
slug rules); every ``recipes/NAME.yaml`` (and ``suites/NAME.yaml``) mentioned exists; the quick
suite's report in docs/quick/ stays linked and its own links resolve; the headline results in the
README are figures of docs/benchmarks.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250
#: The capability pages the README sends a newcomer to; each opens with a summary and links back.
CAPABILITY_PAGES = ["methods", "sparsity", "tickets", "slim-export", "dp", "lst", "vision", "bench", "benchmarks", "reliability"]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
NAMED_YAML = re.compile(r"\b(recipes|suites)/([A-Za-z0-9_.+-]+\.ya?ml)\b")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    return INLINE_CODE.sub("code", FENCE.sub("", text))


def links(text: str) -> list[str]:
    return LINK.findall(_prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped (letters,
    digits, ``_``, ``-`` and spaces kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a markdown file, duplicates numbered ``-1``, ``-2``... as on GitHub."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, title in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """Every relative link of ``page`` that does not resolve, as ``'target: why'``."""
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto, ...
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
        elif not dest.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move detail into docs/"
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def missing_yaml(page: Path) -> list[str]:
    """``recipes/NAME.yaml`` and ``suites/NAME.yaml`` named anywhere in ``page`` (code included)
    that do not exist."""
    names = NAMED_YAML.findall(page.read_text(encoding="utf-8"))
    return [f"{folder}/{name}" for folder, name in names if not (ROOT / folder / name).is_file()]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_recipes_and_suites_exist(page):
    assert missing_yaml(page) == []


def test_capability_pages_are_linked_from_the_readme_and_link_back():
    readme_targets = {t.partition("#")[0] for t in links(README.read_text(encoding="utf-8"))}
    for name in CAPABILITY_PAGES:
        page = ROOT / "docs" / f"{name}.md"
        assert f"docs/{name}.md" in readme_targets, f"README does not link docs/{name}.md"
        text = page.read_text(encoding="utf-8")
        title, _, rest = text.partition("\n\n")
        assert title.startswith("# "), f"{page.name}: starts with a title"
        summary = rest.split("\n\n", 1)[0]
        assert summary and not summary.startswith(("#", "|", "```", "-")), f"{page.name}: a summary paragraph follows the title"
        assert any(t.partition("#")[0] == "../README.md" for t in links(text)), f"{page.name}: links back to the README"
    for name in ["architecture", "api"]:  # written elsewhere; the README links them
        assert f"docs/{name}.md" in readme_targets


def test_quick_suite_report_stays_linked_and_valid():
    """`make bench-quick` copies its report and plots to docs/quick/: a docs page shows them, and
    the copied report's own references (markdown and HTML) resolve."""
    quick = ROOT / "docs" / "quick"
    linked = {(page.parent / t.partition("#")[0]).resolve() for page in pages() if quick not in page.parents for t in links(page.read_text(encoding="utf-8"))}
    assert (quick / "report.md").resolve() in linked and (quick / "report.html").resolve() in linked
    assert broken_links(quick / "report.md") == []
    html = (quick / "report.html").read_text(encoding="utf-8")
    refs = [r for r in re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) if not SCHEME.match(r) and not r.startswith(("#", "//"))]
    assert refs, "report.html references its plots"
    assert [r for r in refs if not (quick / r.partition("#")[0]).exists()] == []
    plots = sorted(p.name for p in (quick / "plots").glob("*.png"))
    assert plots and all(f"plots/{p}" in html for p in plots)


def test_headline_results_are_figures_of_the_benchmarks_page():
    """The README repeats a few figures from docs/benchmarks.md: after a re-render they must still
    be there (a stale headline fails here)."""
    readme = README.read_text(encoding="utf-8")
    section = readme.split("## Headline results", 1)[1].split("\n## ", 1)[0]
    bench = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what ")]
    assert table
    stale = [n for line in table for n in NUMBER.findall(line.split(" | ")[1]) if not re.search(rf"(?<![\d.,]){re.escape(n)}(?![\d]|[.,]\d)", bench)]
    assert stale == []


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("Ship it slim: `slimtune export`", "ship-it-slim-slimtune-export"),
        ("The quick suite (`slimtune bench suites/quick.yaml`)", "the-quick-suite-slimtune-bench-suitesquickyaml"),
        ("Slim models (pruning, distillation, int8)", "slim-models-pruning-distillation-int8"),
        ("DP-SGD vs Opacus", "dp-sgd-vs-opacus"),
        ("What slimtune guarantees", "what-slimtune-guarantees"),
        ("A [link](x.md) and   spaces", "a-link-and---spaces"),
    ],
)
def test_github_slugs(heading, anchor):
    assert slug(heading) == anchor


def test_a_broken_link_is_caught(tmp_path, monkeypatch):
    """The checks can fail: a missing file, a missing heading, a recipe that does not exist."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\n## Real heading\n\ntext\n")
    page = docs / "b.md"
    page.write_text(
        "# B\n\n[ok](a.md) [ok](a.md#real-heading) [ok](#b) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [no anchor](a.md#nope) `[in code](nowhere.md)`\n\n```\n[fenced](nowhere.md)\n```\n"
        "Run `slimtune train recipes/lora.yaml` or recipes/nope.yaml (not recipes/<name>.yaml).\n"
    )
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "lora.yaml").write_text("method: {name: lora}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert broken_links(page) == ["missing.md: docs/missing.md does not exist", "a.md#nope: no heading #nope in docs/a.md"]
    assert missing_yaml(page) == ["recipes/nope.yaml"]
