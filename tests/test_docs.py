"""The README is a quickstart (<= 200 lines); it and docs/ stand on their own (no path outside
the repository, every link and anchor resolves), and quote the stored files' figures."""
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
    for section in ("## Two commands", "## Reading a failure", "## Your model", "## Checking a new release",
                    "## Glossary", "## Layout"):
        assert section in lines, section


# What pointed outside before: the seed's file, the workplace's facts sheet, tools and folders
# beside the checkout, absolute paths of one machine.
OUTSIDE = re.compile(r"(?<![.\w])\.\./|FACTS\.md|seed/000_|/work/|loaded-run|other-cpus")


# Code, tests, pins and baselines cite docs/ instead; ../ there is the project's own place
# beside the checkout (../.compat-envs).
OUTSIDE_IN_CODE = re.compile(r"FACTS\.md|seed/000_|shared/(tools|seed|hooks)|/work/|loaded-run|other-cpus")
CODE = [p for pattern in ("kvcache_repro/**/*.py", "tests/*.py", "baselines/*.json", "requirements*.txt", "conftest.py",
                          "pyproject.toml", "kvq", ".ci/run")
        for p in sorted(ROOT.glob(pattern)) if p.name != "test_docs.py"]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_nothing_refers_outside_the_repository(page):
    hits = [f"{page.name}:{n}: {line.strip()[:100]}" for n, line in enumerate(page.read_text().splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)


def test_no_code_test_or_baseline_cites_a_file_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for p in CODE
            for n, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE_IN_CODE.search(line)]
    assert len(CODE) > 100 and not hits, "\n".join(hits)


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
    """docs/seed.md's table (the user's GiB) and baselines/seed.json's ratios say the same."""
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


def test_the_sample_table_in_the_readme_agrees_with_the_cpu_baselines():
    """The README's sample `./kvq experiment` run (scenario cpu): each quantized row's peak and
    cache ratios lie in baselines/cpu.json's bands, its baseline column is the stored value."""
    block = (ROOT / "README.md").read_text().split("## What the experiment prints", 1)[1].split("\n## ", 1)[0]
    stored = json.loads((ROOT / "baselines" / "cpu.json").read_text())["entries"]
    rows = [line.split() for line in block.splitlines() if re.match(r"^\s+(quanto|hqq)\S*\s+\d+\s", line)]
    assert len(rows) >= 4, "no sample rows found under 'What the experiment prints'"
    for cells in rows:
        backend, batch, peak_ratio, baseline, cache_ratio = cells[0], cells[1], float(cells[6]), float(cells[7]), float(cells[9])
        peak = stored[f"{backend}/b{batch}/peak_allocated"]
        cache = stored[f"{backend}/b{batch}/cache_bytes"]
        assert abs(peak_ratio - peak["ratio"]) <= peak["tolerance"] + 5e-4, (cells, peak)
        assert abs(cache_ratio - cache["ratio"]) <= cache["tolerance"] + 5e-4, (cells, cache)
        assert abs(baseline - peak["ratio"]) <= 5e-4, (cells, peak)
