"""Checking releases of every package the result depends on: ``./kvq compat SPEC ...``
(``python -m kvcache_repro compat SPEC ...``) runs the CPU tier's version-sensitive test
groups against each spec (package_specs.py: a transformers release, ``torch==2.14.1``,
``optimum-quanto==X``, ``hqq==Y``, a combination, or a local pre-release build) in its own
cached environment (compat_envs.py), stores one JSON per spec in compat/runs/, and
rewrites compat/RESULTS.md from all stored runs: one matrix (specs as rows, grouped by the
package they swap, test groups as columns) and one section per spec.

Each failure gets a kind (KINDS, from the test's message: classify), so the table says whose
fault it is; docs/releases.md describes them.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from kvcache_repro.core.provenance import PACKAGES
from kvcache_repro.verdicts.tags import BEHAVIOUR_TAG, HARNESS_TAG

# packaging is imported where versions are compared: ./kvq compat --help lists the groups
# with a bare python3, before the venv exists (kvcache_repro/commands/compat.py).

ROOT = Path(__file__).resolve().parents[2]
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
KINDS = ("behaviour", "harness", "band", "unclassified")
# Run per release by default (~1-2 min each on 2 cores); --full adds the rest of the tier
# (accuracy on the real model, speed, memory, the device-run dry run: minutes each).
DEFAULT_GROUPS = ("test_version_expectations", "test_model_families", "test_cache_semantics",
                  "test_accounting", "test_quantizers", "test_compat", "test_matrix")
# What a swapped package also moves: the numbers (accuracy, peaks) and quanto's build lock.
PACKAGE_GROUPS = {"torch": ("test_accuracy", "test_quanto_lock", "test_peak", "test_seed_claims"),
                  "optimum-quanto": ("test_accuracy", "test_quanto_lock", "test_seed_claims"),
                  "hqq": ("test_accuracy", "test_seed_claims")}
MARKERS = "not gpu and not slow and not benchmark"
WHOLE = "the whole tier"


def groups_for(spec, groups: tuple[str, ...] | None) -> tuple[str, ...]:
    """DEFAULT_GROUPS (or ``groups``) plus what the swapped packages move."""
    out = list(groups or DEFAULT_GROUPS)
    for package in spec.packages:
        out += [g for g in PACKAGE_GROUPS.get(package, ()) if g not in out]
    return tuple(out)


def classify(outcome: str, name: str, message: str) -> str | None:
    """The kind of a test result, or None when it is not a problem (passed, xfailed, a
    plain skip). A harness skip counts: it is a test this release could not be checked by."""
    if HARNESS_TAG in message:
        return "harness"
    if outcome == "xpassed":
        return "behaviour"  # a pinned upstream bug no longer shows: the table is out of date
    if outcome not in ("failed", "error"):
        return None
    if BEHAVIOUR_TAG in message:
        return "behaviour"
    from kvcache_repro.verdicts.comparison import BAND_TESTS  # not at import: --help stays stdlib-only

    return "band" if name.split("[")[0] in BAND_TESTS else "unclassified"


def read_junit(junit_xml: Path) -> list[dict]:
    """One dict per test case: group, name, outcome, message (first line), kind."""
    if not junit_xml.exists():  # pytest stopped before running anything (usage error)
        return []
    cases = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        children = {child.tag: child for child in case}
        tag = next((t for t in ("failure", "error", "skipped") if t in children), None)
        message = (children[tag].get("message") or "") if tag else ""
        if tag == "failure":
            outcome = "xpassed" if "XPASS" in message else "failed"
        elif tag == "skipped":
            outcome = "xfailed" if "xfail" in children[tag].get("type", "") else "skipped"
        else:
            outcome = tag or "passed"
        name = case.get("name", "")
        cases.append({"group": case.get("classname", "").split(".")[-1] or "?", "name": name,
                      "outcome": outcome, "message": message.strip()[:600],
                      "kind": classify(outcome, name, message)})
    return cases


def outcomes_by_group(junit_xml: Path | None, cases: list[dict] | None = None) -> dict[str, Counter]:
    """Per test file (of the junit, or of ``cases``): how many tests passed, failed, errored,
    skipped, xfailed, xpassed."""
    groups: dict[str, Counter] = {}
    for case in read_junit(junit_xml) if cases is None else cases:
        groups.setdefault(case["group"], Counter())[case["outcome"]] += 1
    return groups


def _outcome_table(groups: dict[str, Counter]) -> list[str]:
    return ["| test group | " + " | ".join(OUTCOMES) + " |", "|---|" + "---:|" * len(OUTCOMES),
            *(f"| {g} | " + " | ".join(str(groups[g][o]) for o in OUTCOMES) + " |" for g in sorted(groups))]


def markdown_section(version: str, versions: dict[str, str], seconds: float,
                     groups: dict[str, Counter], date: str) -> str:
    """The per-release outcome table of one-off runs (stored runs: release_section)."""
    bad = sum(groups[g][o] for g in groups for o in ("failed", "error", "xpassed"))
    verdict = ("all passed" if bad == 0 else f"{bad} FAILED") if groups else "NO TESTS RAN"
    stack = ", ".join(f"{k} {v}" for k, v in versions.items())
    return "\n".join([f"## transformers {version} - {verdict}", "", f"{date}; {stack}; {seconds:.0f} s", "",
                      *_outcome_table(groups)]) + "\n"


def summarize(version: str, cases: list[dict], *, installed: bool = True, install_error: str = "",
              versions: dict | None = None, seconds: float = 0.0, groups_run: tuple[str, ...] = (),
              date: str = "", pytest_rc: int | None = None) -> dict:
    return {"release": version, "installed": installed, "install_error": install_error,
            "versions": versions or {}, "seconds": round(seconds, 1), "groups_run": list(groups_run),
            "date": date, "pytest_rc": pytest_rc, "cases": cases}


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


def _full(run: dict) -> bool:
    return WHOLE in run.get("groups_run", ())


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
    return axis, key, run["release"], _full(run)


def stack_cell(run: dict, pins: dict[str, str]) -> str:
    """What the run's environment had that differs from the pins (its stack, read back)."""
    diff = [f"{k} {v}" for k, v in (run.get("versions") or {}).items() if k in pins and v != pins[k]
            and not (k == "torch" and v.split("+")[0] == pins[k])]
    return ", ".join(diff) or "the pins"


def _label(run: dict) -> str:
    return run["release"] + (" (full tier)" if _full(run) else "")


def run_file(run: dict) -> str:
    """compat/runs/V.json for the groups, V-full.json for the whole tier (both kept)."""
    return run["release"] + ("-full" if _full(run) else "") + ".json"


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
    lines = [f"### {title}" + (" (full tier)" if _full(run) else ""), ""]
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
    lines += [*_outcome_table(outcomes_by_group(None, run["cases"])), ""]
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


def speed_side_by_side(candidate_python: str, log=print, run=None) -> dict:
    """Decode time of the spec's environment against the pinned one (this interpreter's),
    interleaved on this machine (side_by_side.py), as stored with the run: per backend the
    ratio, its blocks and the verdict. A worker that fails is a result too (``error``)."""
    from kvcache_repro.releases import side_by_side

    started = time.perf_counter()
    try:
        found, pinned, candidate = (run or side_by_side.run)(
            sys.executable, candidate_python, log=lambda line: log("  side by side:" + line))
    except RuntimeError as error:
        return {"error": str(error)}
    return {"setup": side_by_side.DEFAULT_SETUP, "margin": side_by_side.MARGIN, "pinned": pinned,
            "candidate": candidate, "seconds": round(time.perf_counter() - started, 1),
            "verdicts": {name: {"ratio": round(r.ratio, 4), "blocks": [round(b, 4) for b in r.block_ratios],
                                "verdict": r.verdict} for name, r in found.items()}}


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


# What a stored run says its environment had (read there: the versions of its own imports).
VERSIONS = ("import json, torch, transformers; from importlib.metadata import version as v; "
            "print(json.dumps({'transformers': transformers.__version__, 'optimum-quanto': "
            "v('optimum-quanto'), 'hqq': v('hqq'), 'torch': torch.__version__, "
            "'huggingface-hub': v('huggingface-hub'), 'tokenizers': v('tokenizers')}))")


def run_spec(spec, groups: tuple[str, ...] | None, root: Path = ROOT, log=print, speed: bool = True) -> dict:
    """The spec's test groups (None: the whole tier) in its environment, as a stored run;
    with ``speed``, its decode time side by side with the pin's after the tests."""
    from kvcache_repro.releases import compat_envs

    label, date = spec.label, datetime.date.today().isoformat()
    log(f"compat {label}: environment ({compat_envs.envs_dir()})")
    env = compat_envs.spec_env(spec, root)
    if env.python is None:
        log(f"compat {label}: cannot install:\n{env.error}")
        run = summarize(label, [], installed=False, install_error=env.error, date=date)
        return {**run, "spec": spec.to_json()}
    junit = root / "compat" / f"junit-{label}.xml"
    junit.unlink(missing_ok=True)  # never read a previous run's results
    cmd = [str(env.python), "-m", "pytest", "-m", MARKERS, "-q", "-p", "no:cacheprovider", "-p",
           "no:randomly", f"--junitxml={junit}", *(f"tests/{g}.py" for g in groups or ())]
    log(f"compat {label}: {' '.join(cmd)}")
    started = time.perf_counter()
    environ = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(cmd, cwd=root, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (root / "compat" / f"pytest-{label}.log").write_text(proc.stdout + proc.stderr)
    probe = subprocess.run([str(env.python), "-c", VERSIONS], capture_output=True, text=True)
    versions = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else {}
    cases = read_junit(junit)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    log(f"compat {label}: pytest exit {proc.returncode} in {seconds:.0f} s, {len(cases)} tests; {tail}")
    run = summarize(label, cases, versions=versions, seconds=seconds, groups_run=groups or (WHOLE,),
                    date=date, pytest_rc=proc.returncode)
    run.update(spec=spec.to_json(), suite=suite_commit(root))
    if speed:
        log(f"compat {label}: decode time side by side with the pin (a few minutes)")
        run["speed"] = speed_side_by_side(str(env.python), log)
    return run


def suite_commit(root: Path = ROOT) -> str:
    """The suite's commit (+ "-dirty"), so a stored run says which tests produced it."""
    if os.environ.get("KVQ_SUITE_COMMIT"):
        return os.environ["KVQ_SUITE_COMMIT"]
    try:
        git = {"cwd": root, "capture_output": True, "text": True}
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git)
        paths = ("kvcache_repro", "tests", "conftest.py")
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], **git)
    except OSError:
        return "?"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "?"


def probe_spec(spec, root: Path = ROOT) -> dict:
    from kvcache_repro.releases import compat_envs

    env = compat_envs.spec_env(spec, root)
    if env.python is None:
        return {"spec": spec.label, "install": "cannot install: " + (env.error.splitlines() or ["?"])[-1]}
    proc = subprocess.run([str(env.python), "-m", "kvcache_repro.releases.probe"], cwd=root,
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode or not proc.stdout.strip():
        return {"spec": spec.label, "probe": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {"spec": spec.label, **json.loads(proc.stdout.strip().splitlines()[-1])}

