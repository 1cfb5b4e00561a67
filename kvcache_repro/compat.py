"""Checking another transformers release: the environment it needs, and the Markdown
table of results per test group that ``nox -s compat -- VERSION`` appends to
compat/RESULTS.md.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from packaging.version import Version

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def requirements_for(version: str, pinned: list[str]) -> list[str]:
    """The pinned requirement lines with transformers swapped for ``version``, and
    optimum-quanto moved where that transformers needs it (FACTS.md: < 4.47 needs 0.2.4;
    0.2.7 fails there with "shift must be specified for qtypes lower than 8-bit")."""
    out = []
    for line in pinned:
        name = line.split("==")[0].strip().lower()
        if name == "transformers":
            line = f"transformers=={version}"
        elif name == "optimum-quanto" and Version(version) < Version("4.47"):
            line = "optimum-quanto==0.2.4"
        out.append(line)
    return out


def outcomes_by_group(junit_xml: Path) -> dict[str, Counter]:
    """Per test file: how many tests passed, failed, errored, skipped, xfailed, xpassed.
    No file (pytest refused to start, e.g. an unsupported version) gives no groups."""
    groups: dict[str, Counter] = {}
    if not junit_xml.exists():  # pytest stopped before running anything (usage error)
        return groups
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        group = case.get("classname", "").split(".")[-1] or "?"
        children = {child.tag: child for child in case}
        if "failure" in children:
            outcome = "xpassed" if "XPASS" in (children["failure"].get("message") or "") else "failed"
        elif "error" in children:
            outcome = "error"
        elif "skipped" in children:
            kind = children["skipped"].get("type", "")
            outcome = "xfailed" if "xfail" in kind else "skipped"
        else:
            outcome = "passed"
        groups.setdefault(group, Counter())[outcome] += 1
    return groups


def markdown_section(version: str, versions: dict[str, str], seconds: float,
                     groups: dict[str, Counter], date: str) -> str:
    bad = sum(groups[g][o] for g in groups for o in ("failed", "error", "xpassed"))
    verdict = "all passed" if bad == 0 and groups else (f"{bad} FAILED" if groups else "NO TESTS RAN")
    lines = [f"## transformers {version} - {verdict}", "",
             f"{date}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {seconds:.0f} s", "",
             "| test group | " + " | ".join(OUTCOMES) + " |", "|---|" + "---:|" * len(OUTCOMES)]
    for group in sorted(groups):
        lines.append(f"| {group} | " + " | ".join(str(groups[group][o]) for o in OUTCOMES) + " |")
    return "\n".join(lines) + "\n"
