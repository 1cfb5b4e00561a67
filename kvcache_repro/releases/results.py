"""compat/RESULTS.md from the stored runs of ``./kvq compat`` (compat/runs/*.json): one matrix
(specs as rows, grouped by the package they swap, test groups as columns), the probed
behaviours per release, and one section per spec."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from kvcache_repro.core.provenance import PACKAGES
from kvcache_repro.releases.compat import KINDS, ROOT, WHOLE, full_tier

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def outcomes_by_group(cases: list[dict]) -> dict[str, Counter]:
    """Per test file: how many tests passed, failed, errored, skipped, xfailed, xpassed."""
    groups: dict[str, Counter] = {}
    for case in cases:
        groups.setdefault(case["group"], Counter())[case["outcome"]] += 1
    return groups


def _outcome_table(groups: dict[str, Counter]) -> list[str]:
    return ["| test group | " + " | ".join(OUTCOMES) + " |", "|---|" + "---:|" * len(OUTCOMES),
            *(f"| {g} | " + " | ".join(str(groups[g][o]) for o in OUTCOMES) + " |" for g in sorted(groups))]


def _kinds(cases: list[dict]) -> str:
    kinds = Counter(c["kind"] for c in cases if c["kind"])
    return ", ".join(f"{kinds[k]} {k}" for k in KINDS if kinds[k])


def group_cell(cases: list[dict]) -> str:
    """One matrix cell: "ok 96 (22 xfail)" or "FAIL 3: behaviour 2, harness 1 / 96"."""
    if not cases:
        return "-"
    outcomes = Counter(c["outcome"] for c in cases)
    if kinds := _kinds(cases):
        return f"**{sum(1 for c in cases if c['kind'])}**: {kinds} / {len(cases)}"
    extra = ", ".join(f"{outcomes[o]} {o}" for o in ("xfailed", "skipped") if outcomes[o])
    return f"ok {outcomes['passed']}" + (f" ({extra})" if extra else "")


def run_order(run: dict) -> tuple:
    """Rows grouped by the package swapped (package_specs.PACKAGES order; combinations
    last), oldest release first within a group; a full-tier run after its groups' run."""
    from packaging.version import Version

    spec = run.get("spec")  # runs stored before specs swapped transformers
    packages = [i["package"] for i in spec["items"]] if spec else ["transformers"]
    axis = PACKAGES.index(packages[0]) if len(packages) == 1 else len(PACKAGES)
    try:
        key = Version((run.get("versions") or {}).get(packages[0]) or run["release"])
    except Exception:  # a local build's label
        key = Version("0")
    return axis, key, run["release"], full_tier(run)


def stack_cell(run: dict, pins: dict[str, str]) -> str:
    """What the run's environment had that differs from the pins (its stack, read back)."""
    diff = [f"{k} {v}" for k, v in (run.get("versions") or {}).items() if k in pins and v != pins[k]
            and not (k == "torch" and v.split("+")[0] == pins[k])]
    return ", ".join(diff) or "the pins"


def _label(run: dict) -> str:
    return run["release"] + (" (full tier)" if full_tier(run) else "")


def matrix_table(runs: list[dict], pins: dict[str, str] | None = None) -> str:
    """Specs as rows (grouped by package, oldest first), test groups as columns."""
    if not runs:
        return "(no runs stored in compat/runs/)\n"
    if pins is None:
        from kvcache_repro.releases.package_specs import pinned
        pins = pinned(ROOT)
    runs = sorted(runs, key=run_order)
    groups = sorted({c["group"] for r in runs for c in r["cases"]}
                    | {g for r in runs for g in r["groups_run"] if g != WHOLE})
    lines = ["| spec | differs from the pins | verdict | decode time vs pin |"
             + "".join(f" {g.removeprefix('test_')} |" for g in groups),
             "|---|---|---|---|" + "---|" * len(groups)]
    for run in runs:
        if not run["installed"]:
            first = (run["install_error"].strip().splitlines() or ["?"])[-1][:80].replace("|", "/")
            lines.append(f"| {_label(run)} | - | cannot install: {first} | - |" + " |" * len(groups))
            continue
        verdict = _kinds(run["cases"]) or "passes"
        if not run["cases"]:
            verdict = f"NO TESTS RAN (pytest exit {run['pytest_rc']})"
        cells = [group_cell([c for c in run["cases"] if c["group"] == g])
                 if g in run["groups_run"] or any(c["group"] == g for c in run["cases"]) else "not run"
                 for g in groups]
        lines.append(f"| {_label(run)} | {stack_cell(run, pins)} | {verdict} | {speed_cell(run)} |"
                     + "".join(f" {c} |" for c in cells))
    return "\n".join(lines) + "\n"


def release_section(run: dict) -> str:
    spec, title = run.get("spec"), "transformers " + run["release"]
    if spec and spec["text"] != run["release"]:
        title = "spec " + spec["text"]
    lines = [f"### {title}" + (" (full tier)" if full_tier(run) else ""), ""]
    if not run["installed"]:
        error = run["install_error"].strip()
        return "\n".join(lines + ["Could not install; pip said:", "", "```", error, "```", ""])
    stack = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    lines += [f"{run['date']}; {stack}; {run['seconds']:.0f} s; suite {run.get('suite', '?')}; groups: "
              + (", ".join(run["groups_run"]) or WHOLE), ""]
    speed = run.get("speed")
    if speed and "error" not in speed:
        lines += [f"Decode time against the pin, side by side ({speed['setup']} setup, "
                  f"{speed['seconds']:.0f} s; verdict beyond {speed['margin']:.0%}, "
                  "releases/side_by_side.py):", ""]
        lines += [f"- {name}: {v['ratio']:.3f} (blocks {min(v['blocks']):.3f}..{max(v['blocks']):.3f}): "
                  f"{v['verdict']}" for name, v in speed["verdicts"].items()] + [""]
    elif speed:
        lines += [f"Decode time against the pin: not measured, {speed['error'].splitlines()[0]}", ""]
    lines += [*_outcome_table(outcomes_by_group(run["cases"])), ""]
    for kind in KINDS:
        hits = [c for c in run["cases"] if c["kind"] == kind]
        if hits:
            lines += [f"{kind} ({len(hits)}):", ""]
            lines += [f"- `{c['group']}::{c['name']}` ({c['outcome']}): "
                      + (c["message"] or c["outcome"]).splitlines()[0][:300] for c in hits[:40]]
            if len(hits) > 40:
                lines.append(f"- ... and {len(hits) - 40} more (compat/runs/{run['release']}.json)")
            lines.append("")
    return "\n".join(lines)


HEADER = """# Compatibility runs

Written by `./kvq compat SPEC ...` from compat/runs/*.json (one per spec, the latest run of
each). A spec swaps one or more of transformers, torch, optimum-quanto and hqq for the pins
of requirements.txt (kvcache_repro/releases/package_specs.py); rows are grouped by the package
swapped, combinations last. Kinds of failure: **behaviour** = a package behaves
differently from kvcache_repro/verdicts/expectations.py for this range, or produces non-finite
numbers (entry and observation in the message; an xpassed is a pinned bug that no longer
shows); **harness** = the suite cannot drive this release (what is missing is named; a
skip, never counted as a rejection); **band** = a measurement outside its stored baseline
band; **unclassified** = anything else. "not run" = group not selected for that run (see
docs/releases.md).

"""


def probe_table(probes: list[dict]) -> str:
    """Releases as rows, probed behaviours (kvcache_repro/releases/probe.py) as columns; a cell that
    differs from the row above is bold, so each change shows at the first release with it."""
    from packaging.version import Version

    def shown(p: dict, k: str):  # the backends list is long; what changes is fp8
        return ("fp8: yes" if "fp8" in p[k].split(",") else "fp8: no") if k == "backends" else p[k]

    probes = sorted(probes, key=lambda p: (Version(p.get("transformers", "0")), p.get("spec", "")))
    keys = [k for k in dict.fromkeys(k for p in probes for k in p) if k not in ("transformers", "spec")]
    lines = ["| release | " + " | ".join(k.removeprefix("family:") for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    previous: dict = {}
    for p in probes:
        cells = []
        for k in keys:
            value = str(shown(p, k) if k in p else "not probed").splitlines()[0][:70].replace("|", "/")
            changed = k in previous and k in p and (
                previous[k] != p[k] if k != "backends" else ("fp8" in previous[k]) != ("fp8" in p[k]))
            cells.append(f"**{value}**" if changed else value)
        lines.append(f"| {p.get('spec', p.get('transformers', '?'))} | " + " | ".join(cells) + " |")
        previous = p
    return "\n".join(lines) + "\n"


def write_results(runs_dir: Path, out: Path, notes: str = "", probes_dir: Path | None = None) -> str:
    runs = sorted((json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))), key=run_order)
    text = HEADER + (notes + "\n\n" if notes else "") + "## Matrix\n\n" + matrix_table(runs)
    probes = [json.loads(p.read_text()) for p in sorted(probes_dir.glob("*.json"))] if probes_dir else []
    if probes:
        text += ("\n## Behaviours per release (bisection)\n\n`./kvq compat --probe V ...` (kvcache_repro/"
                 "releases/probe.py, quanto4 for the families, seconds per release): the observations the "
                 "expectation ranges come from. Bold: different from the release above, i.e. the first "
                 "release showing it among those probed.\n\n" + probe_table(probes))
    text += "\n## Per release\n\n" + "\n".join(release_section(r) for r in runs)
    out.write_text(text)
    return text


def speed_cell(run: dict) -> str:
    """The matrix's speed column: what is slower or faster than the pin, or "="."""
    speed = run.get("speed")
    if not speed:
        return "not run"
    if "error" in speed:
        return "FAILED: " + speed["error"].splitlines()[0][:60].replace("|", "/")
    moved = [f"{name} {v['ratio']:.2f} {v['verdict']}" for name, v in speed["verdicts"].items()
             if v["verdict"] != "not distinguishable"]
    return "**" + ", ".join(moved) + "**" if moved else "= (within " + f"{speed['margin']:.0%})"
