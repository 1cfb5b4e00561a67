"""The README is a quickstart a newcomer can read (<= 200 lines), and it and docs/ stand on
their own: no path outside the repository, every link and anchor resolves, and the
figures they quote agree with the stored files they come from."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200  # a quickstart; the method lives in docs/


def test_readme_is_a_quickstart():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    for section in ("## Two commands", "## Reading a failure", "## Your model on your GPU", "## Checking a new release",
                    "## Glossary", "## Layout"):
        assert section in lines, section


# What pointed outside the repository before: the seed's file and the facts sheet of the
# workplace, tools and folders beside the checkout, absolute paths of one machine.
OUTSIDE = re.compile(r"(?<![.\w])\.\./|FACTS\.md|seed/000_|/work/|loaded-run|other-cpus")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_nothing_refers_outside_the_repository(page):
    hits = [f"{page.name}:{n}: {line.strip()[:100]}" for n, line in enumerate(page.read_text().splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", page.read_text())}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


def test_the_slug_is_github_s():
    assert slug("The seed's claims") == "the-seeds-claims"
    assert slug("Per-release values") == "per-release-values"
    assert slug("`./kvq compat` specs") == "kvq-compat-specs"


def test_the_seed_figures_agree_with_the_stored_seed_baselines():
    """docs/seed.md's table (the user's published GiB) and baselines/seed.json (the ratios
    the GPU tier compares with) must say the same thing."""
    text = (ROOT / "docs" / "seed.md").read_text()
    reserved = {name: float(m.group(1)) for name in ("none", "quanto (4-bit)", "HQQ (4-bit)")
                for m in [re.search(rf"^\| {re.escape(name)} \|(?: [\d.]+ \|){{3}} ([\d.]+) \|", text, re.M)]}
    stored = {k: e["ratio"] for k, e in json.loads((ROOT / "baselines" / "seed.json").read_text())["entries"].items()}
    assert round(reserved["quanto (4-bit)"] / reserved["none"], 3) == stored["quanto4/b200/reserved_after"]
    assert round(reserved["HQQ (4-bit)"] / reserved["none"], 3) == stored["hqq4/b200/reserved_after"]
    readme = (ROOT / "README.md").read_text()
    quoted = "none {:.2f} GB, quanto {:.2f} GB, HQQ {:.2f} GB".format(
        reserved["none"], reserved["quanto (4-bit)"], reserved["HQQ (4-bit)"])
    assert quoted in " ".join(readme.split())
