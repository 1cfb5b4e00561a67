"""Checking releases of every package the result depends on: ``./kvq compat SPEC ...``
(``python -m kvcache_repro compat SPEC ...``) runs the CPU tier's version-sensitive test
groups against each spec (package_specs.py: a transformers release, ``torch==2.14.1``,
``optimum-quanto==X``, ``hqq==Y``, a combination, or a local pre-release build) in its own
cached environment (compat_envs.py), stores one JSON per spec in compat/runs/, and
rewrites compat/RESULTS.md from all stored runs: one matrix (specs as rows, grouped by the
package they swap, test groups as columns) and one section per spec.

Every failure is put in one of the kinds below from what the test said, so the table says
whose fault it is:
- behaviour: transformers behaves differently from the expectation table for this range
  (the message names the entry and what was observed) - record it, or report upstream;
- harness: the suite cannot drive this release (a config/API it does not know) - a skip or
  error naming what is missing, never counted as a rejection;
- band: a measurement is outside its stored baseline band;
- unclassified: any other failure (read the message).
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

# The prefixes the suite's messages start with; the classifier reads them back from junit.
from kvcache_repro.verdicts.tags import BEHAVIOUR_TAG, HARNESS_TAG

# packaging is imported where versions are compared, not here: ./kvq compat --help lists this
# module's groups with a bare python3, before the venv exists (kvcache_repro/commands/compat.py).

ROOT = Path(__file__).resolve().parents[2]
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
KINDS = ("behaviour", "harness", "band", "unclassified")

# Tests that compare a measurement with a stored baseline band (plugin/summary.py BAND_TESTS).
BAND_TESTS = ("test_ratios_within_baseline_bands", "test_accuracy_within_baseline_bands",
              "test_speed_within_baseline_bands")

# The version-sensitive groups run per release by default (~1-2 min each on 2 cores).
# Left out unless --full: accuracy on the real model, speed, the memory experiment, the
# device-run dry run (minutes each; they depend on transformers only through the paths
# the groups below already cover).
DEFAULT_GROUPS = ("test_version_expectations", "test_model_families", "test_cache_semantics",
                  "test_accounting", "test_quantizers", "test_compat", "test_matrix")
# What else depends on the swapped package: torch and the quantizers move the numbers
# (accuracy bands, peaks) and the extension build (the lock); ~1.5 min more.
PACKAGE_GROUPS = {"torch": ("test_accuracy", "test_quanto_lock", "test_peak", "test_seed_claims"),
                  "optimum-quanto": ("test_accuracy", "test_quanto_lock", "test_seed_claims"),
                  "hqq": ("test_accuracy", "test_seed_claims")}
MARKERS = "not gpu and not slow and not benchmark"


def groups_for(spec, groups: tuple[str, ...] | None) -> tuple[str, ...]:
    """DEFAULT_GROUPS (or ``groups``) plus what the swapped packages move."""
    out = list(groups or DEFAULT_GROUPS)
    for package in spec.packages:
        out += [g for g in PACKAGE_GROUPS.get(package, ()) if g not in out]
    return tuple(out)


# ---- reading pytest's junit -------------------------------------------------------------

def classify(outcome: str, name: str, message: str) -> str | None:
    """The kind of a test result, or None when it is not a problem (passed, xfailed, a
    plain skip). A harness skip counts: it is a test this release could not be checked by."""
    if HARNESS_TAG in message:
        return "harness"
    if outcome not in ("failed", "error", "xpassed"):
        return None
    if outcome == "xpassed":
        return "behaviour"  # a pinned upstream bug no longer shows: the table is out of date
    if BEHAVIOUR_TAG in message:
        return "behaviour"
    if name.split("[")[0] in BAND_TESTS:
        return "band"
    return "unclassified"


def read_junit(junit_xml: Path) -> list[dict]:
    """One dict per test case: group, name, outcome, message (first line), kind."""
    cases = []
    if not junit_xml.exists():  # pytest stopped before running anything (usage error)
        return cases
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        group = case.get("classname", "").split(".")[-1] or "?"
        children = {child.tag: child for child in case}
        message = ""
        if "failure" in children:
            message = children["failure"].get("message") or ""
            outcome = "xpassed" if "XPASS" in message else "failed"
        elif "error" in children:
            outcome, message = "error", children["error"].get("message") or ""
        elif "skipped" in children:
            kind = children["skipped"].get("type", "")
            outcome = "xfailed" if "xfail" in kind else "skipped"
            message = children["skipped"].get("message") or ""
        else:
            outcome = "passed"
        name = case.get("name", "")
        cases.append({"group": group, "name": name, "outcome": outcome,
                      "message": message.strip()[:600], "kind": classify(outcome, name, message)})
    return cases


def outcomes_by_group(junit_xml: Path) -> dict[str, Counter]:
    """Per test file: how many tests passed, failed, errored, skipped, xfailed, xpassed."""
    groups: dict[str, Counter] = {}
    for case in read_junit(junit_xml):
        groups.setdefault(case["group"], Counter())[case["outcome"]] += 1
    return groups


def markdown_section(version: str, versions: dict[str, str], seconds: float,
                     groups: dict[str, Counter], date: str) -> str:
    """The per-release outcome table (kept for one-off runs; see release_section)."""
    bad = sum(groups[g][o] for g in groups for o in ("failed", "error", "xpassed"))
    verdict = "all passed" if bad == 0 and groups else (f"{bad} FAILED" if groups else "NO TESTS RAN")
    lines = [f"## transformers {version} - {verdict}", "",
             f"{date}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {seconds:.0f} s", "",
             "| test group | " + " | ".join(OUTCOMES) + " |", "|---|" + "---:|" * len(OUTCOMES)]
    for group in sorted(groups):
        lines.append(f"| {group} | " + " | ".join(str(groups[group][o]) for o in OUTCOMES) + " |")
    return "\n".join(lines) + "\n"


# ---- one run per release, stored as JSON -----------------------------------------------

def summarize(version: str, cases: list[dict], *, installed: bool = True, install_error: str = "",
              versions: dict | None = None, seconds: float = 0.0, groups_run: tuple[str, ...] = (),
              date: str = "", pytest_rc: int | None = None) -> dict:
    return {"release": version, "installed": installed, "install_error": install_error,
            "versions": versions or {}, "seconds": round(seconds, 1), "groups_run": list(groups_run),
            "date": date, "pytest_rc": pytest_rc, "cases": cases}


def group_cell(cases: list[dict]) -> str:
    """One matrix cell: "ok 96 (22 xfail)" or "FAIL 3: behaviour 2, harness 1 / 96"."""
    if not cases:
        return "-"
    outcomes = Counter(c["outcome"] for c in cases)
    kinds = Counter(c["kind"] for c in cases if c["kind"])
    extra = [f"{outcomes[o]} {o}" for o in ("xfailed", "skipped") if outcomes[o]]
    if not kinds:
        return f"ok {outcomes['passed']}" + (f" ({', '.join(extra)})" if extra else "")
    return (f"**{sum(kinds.values())}**: " + ", ".join(f"{kinds[k]} {k}" for k in KINDS if kinds[k])
            + f" / {len(cases)}")


def swapped(run: dict) -> tuple[str, ...]:
    """The packages a run's spec swapped (runs stored before specs: transformers)."""
    spec = run.get("spec")
    return tuple(i["package"] for i in spec["items"]) if spec else ("transformers",)


def run_order(run: dict) -> tuple:
    """Rows grouped by the package swapped (package_specs.PACKAGES order; combinations
    last), oldest release first within a group; a full-tier run after its groups' run."""
    from packaging.version import Version

    from kvcache_repro.releases.package_specs import PACKAGES

    packages = swapped(run)
    axis = PACKAGES.index(packages[0]) if len(packages) == 1 else len(PACKAGES)
    versions = run.get("versions") or {}
    try:
        key = Version(versions.get(packages[0]) or run["release"])
    except Exception:  # a local build's label
        key = Version("0")
    return axis, key, run["release"], "the whole tier" in run.get("groups_run", ())


def stack_cell(run: dict, pins: dict[str, str]) -> str:
    """What the run's environment had that differs from the pins (its stack, read back)."""
    versions = run.get("versions") or {}
    diff = [f"{k} {v}" for k, v in versions.items() if k in pins and v != pins[k] and not (
        k == "torch" and v.split("+")[0] == pins[k])]
    return ", ".join(diff) or "the pins"


def matrix_table(runs: list[dict], pins: dict[str, str] | None = None) -> str:
    """Specs as rows (grouped by package, oldest first), test groups as columns."""
    if not runs:
        return "(no runs stored in compat/runs/)\n"
    if pins is None:
        from kvcache_repro.releases.package_specs import pinned
        pins = pinned(ROOT)
    runs = sorted(runs, key=run_order)
    groups = sorted({c["group"] for r in runs for c in r["cases"]}
                    | {g for r in runs for g in r["groups_run"] if g != "the whole tier"})
    lines = ["| spec | differs from the pins | verdict | decode time vs pin |"
             + "".join(f" {g.removeprefix('test_')} |" for g in groups),
             "|---|---|---|---|" + "---|" * len(groups)]
    for run in runs:
        if not run["installed"]:
            first = (run["install_error"].strip().splitlines() or ["?"])[-1]
            lines.append(f"| {_label(run)} | - | cannot install: {first[:80].replace('|', '/')} | - |"
                         + " |" * len(groups))
            continue
        kinds = Counter(c["kind"] for c in run["cases"] if c["kind"])
        if not run["cases"]:
            verdict = f"NO TESTS RAN (pytest exit {run['pytest_rc']})"
        elif kinds:
            verdict = ", ".join(f"{kinds[k]} {k}" for k in KINDS if kinds[k])
        else:
            verdict = "passes"
        cells = [group_cell([c for c in run["cases"] if c["group"] == g])
                 if (g in run["groups_run"] or any(c["group"] == g for c in run["cases"])) else "not run"
                 for g in groups]
        lines.append(f"| {_label(run)} | {stack_cell(run, pins)} | {verdict} | {speed_cell(run)} |"
                     + "".join(f" {c} |" for c in cells))
    return "\n".join(lines) + "\n"


def _label(run: dict) -> str:
    return run["release"] + (" (full tier)" if "the whole tier" in run.get("groups_run", ()) else "")


def run_file(run: dict) -> str:
    """compat/runs/V.json for the groups, V-full.json for the whole tier (both kept)."""
    return run["release"] + ("-full" if "the whole tier" in run.get("groups_run", ()) else "") + ".json"


def release_section(run: dict) -> str:
    spec = run.get("spec")
    title = f"spec {spec['text']}" if spec and spec["text"] != run["release"] else f"transformers {run['release']}"
    lines = [f"### {title}" + (" (full tier)" if "the whole tier" in run.get("groups_run", ()) else ""), ""]
    if not run["installed"]:
        lines += ["Could not install; pip said:", "", "```", run["install_error"].strip(), "```", ""]
        return "\n".join(lines)
    lines.append(f"{run['date']}; " + ", ".join(f"{k} {v}" for k, v in run["versions"].items())
                 + f"; {run['seconds']:.0f} s; suite {run.get('suite', '?')}; groups: "
                 + (", ".join(run["groups_run"]) or "the whole tier"))
    lines.append("")
    speed = run.get("speed")
    if speed and "error" not in speed:
        lines += [f"Decode time against the pin, side by side ({speed['setup']} setup, {speed['seconds']:.0f} s; "
                  f"verdict beyond {speed['margin']:.0%}, releases/side_by_side.py):", ""]
        lines += [f"- {name}: {v['ratio']:.3f} (blocks {min(v['blocks']):.3f}..{max(v['blocks']):.3f}): {v['verdict']}"
                  for name, v in speed["verdicts"].items()]
        lines.append("")
    elif speed:
        lines += [f"Decode time against the pin: not measured, {speed['error'].splitlines()[0]}", ""]
    groups = sorted({c["group"] for c in run["cases"]})
    lines += ["| test group | " + " | ".join(OUTCOMES) + " |", "|---|" + "---:|" * len(OUTCOMES)]
    for g in groups:
        n = Counter(c["outcome"] for c in run["cases"] if c["group"] == g)
        lines.append(f"| {g} | " + " | ".join(str(n[o]) for o in OUTCOMES) + " |")
    lines.append("")
    for kind in KINDS:
        hits = [c for c in run["cases"] if c["kind"] == kind]
        if not hits:
            continue
        lines.append(f"{kind} ({len(hits)}):")
        lines.append("")
        for c in hits[:40]:
            first = c["message"].splitlines()[0] if c["message"] else c["outcome"]
            lines.append(f"- `{c['group']}::{c['name']}` ({c['outcome']}): {first[:300]}")
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

    probes = sorted(probes, key=lambda p: (Version(p.get("transformers", "0")), p.get("spec", "")))
    keys = [k for k in dict.fromkeys(k for p in probes for k in p) if k not in ("transformers", "spec")]
    lines = ["| release | " + " | ".join(k.removeprefix("family:") for k in keys) + " |", "|---|" + "---|" * len(keys)]
    previous: dict = {}
    for p in probes:
        cells = []
        for k in keys:
            raw = p.get(k, "not probed")
            if k == "backends" and k in p:  # the list is long; what changes is fp8
                raw = "fp8: yes" if "fp8" in raw.split(",") else "fp8: no"
            value = str(raw).splitlines()[0][:70].replace("|", "/")
            changed = previous and k in previous and k in p and (
                previous[k] != p[k] if k != "backends" else ("fp8" in previous[k]) != ("fp8" in p[k]))
            cells.append(f"**{value}**" if changed else value)
        lines.append(f"| {p.get('spec', p.get('transformers', '?'))} | " + " | ".join(cells) + " |")
        previous = p
    return "\n".join(lines) + "\n"


def write_results(runs_dir: Path, out: Path, notes: str = "", probes_dir: Path | None = None) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    runs.sort(key=run_order)
    text = HEADER + (notes + "\n\n" if notes else "") + "## Matrix\n\n" + matrix_table(runs)
    probes = [json.loads(p.read_text()) for p in sorted(probes_dir.glob("*.json"))] if probes_dir else []
    if probes:
        text += ("\n## Behaviours per release (bisection)\n\n`./kvq compat --probe V ...` (kvcache_repro/releases/probe.py, "
                 "quanto4 for the families, seconds per release): the observations the expectation ranges come "
                 "from. Bold: different from the release above, i.e. the first release showing it among "
                 "those probed.\n\n" + probe_table(probes))
    text += "\n## Per release\n\n" + "\n".join(release_section(r) for r in runs)
    out.write_text(text)
    return text


def speed_side_by_side(candidate_python: str, log=print, run=None) -> dict:
    """Decode time of the spec's environment against the pinned one (this interpreter's),
    interleaved on this machine (side_by_side.py), as stored with the run: per backend the
    ratio, its blocks and the verdict. A worker that fails is a result too (``error``)."""
    from kvcache_repro.releases import side_by_side

    run = run or side_by_side.run
    started = time.perf_counter()
    try:
        found, pinned, candidate = run(sys.executable, candidate_python, log=lambda line: log("  side by side:" + line))
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


def run_spec(spec, groups: tuple[str, ...] | None, root: Path = ROOT, log=print, speed: bool = True) -> dict:
    """The spec's test groups (None: the whole tier) in its environment, as a stored run;
    with ``speed``, its decode time side by side with the pin's after the tests."""
    from kvcache_repro.releases import compat_envs

    label = spec.label
    date = datetime.date.today().isoformat()
    log(f"compat {label}: environment ({compat_envs.envs_dir()})")
    env = compat_envs.spec_env(spec, root)
    if env.python is None:
        log(f"compat {label}: cannot install:\n{env.error}")
        run = summarize(label, [], installed=False, install_error=env.error, date=date)
        run["spec"] = spec.to_json()
        return run
    junit = root / "compat" / f"junit-{label}.xml"
    junit.unlink(missing_ok=True)  # never read a previous run's results
    targets = [f"tests/{g}.py" for g in groups] if groups else []
    cmd = [str(env.python), "-m", "pytest", "-m", MARKERS, "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           f"--junitxml={junit}", *targets]
    log(f"compat {label}: {' '.join(cmd)}")
    environ = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (root / "compat" / f"pytest-{label}.log").write_text(proc.stdout + proc.stderr)
    probe = subprocess.run([str(env.python), "-c",
                            "import json, torch, transformers; from importlib.metadata import version as v; "
                            "print(json.dumps({'transformers': transformers.__version__, 'optimum-quanto': "
                            "v('optimum-quanto'), 'hqq': v('hqq'), 'torch': torch.__version__, "
                            "'huggingface-hub': v('huggingface-hub'), 'tokenizers': v('tokenizers')}))"],
                           capture_output=True, text=True)
    versions = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else {}
    cases = read_junit(junit)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    log(f"compat {label}: pytest exit {proc.returncode} in {seconds:.0f} s, {len(cases)} tests; {tail}")
    run = summarize(label, cases, versions=versions, seconds=seconds, groups_run=groups or ("the whole tier",),
                    date=date, pytest_rc=proc.returncode)
    run["spec"] = spec.to_json()
    run["suite"] = suite_commit(root)
    if speed:
        log(f"compat {label}: decode time side by side with the pin (a few minutes)")
        run["speed"] = speed_side_by_side(str(env.python), log)
    return run


def suite_commit(root: Path = ROOT) -> str:
    """The suite's commit (+ "-dirty"), so a stored run says which tests produced it."""
    if os.environ.get("KVQ_SUITE_COMMIT"):
        return os.environ["KVQ_SUITE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kvcache_repro", "tests", "conftest.py"],
                               cwd=root, capture_output=True, text=True)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "?"
    except OSError:
        return "?"


def probe_spec(spec, root: Path = ROOT) -> dict:
    from kvcache_repro.releases import compat_envs

    env = compat_envs.spec_env(spec, root)
    head = {"spec": spec.label}
    if env.python is None:
        return {**head, "install": "cannot install: " + (env.error.splitlines() or ["?"])[-1]}
    proc = subprocess.run([str(env.python), "-m", "kvcache_repro.releases.probe"], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode or not proc.stdout.strip():
        return {**head, "probe": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {**head, **json.loads(proc.stdout.strip().splitlines()[-1])}


def command(args) -> int:
    """``./kvq compat`` with its parsed arguments (kvcache_repro/commands/compat.py): the exit code."""
    from kvcache_repro.releases import package_specs

    runs_dir = ROOT / "compat" / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        specs = [package_specs.parse(text) for text in args.specs] or [
            package_specs.parse(package_specs.pinned(ROOT)["transformers"])]
    except package_specs.SpecError as error:
        print(f"kvq compat: {error}", file=sys.stderr)
        return 2
    chosen = tuple(args.groups.split(",")) if args.groups else None
    probes_dir = ROOT / "compat" / "probes"
    if args.probe:
        probes_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            probe = probe_spec(spec)
            (probes_dir / f"{spec.label}.json").write_text(json.dumps(probe, indent=1) + "\n")
            print(json.dumps(probe)[:400])
    elif not args.report_only:
        for spec in specs:
            run = run_spec(spec, None if args.full else groups_for(spec, chosen), speed=not args.no_speed)
            (runs_dir / run_file(run)).write_text(json.dumps(run, indent=1) + "\n")
    notes = ROOT / "compat" / "notes.md"  # hand-written: what changed where (bisected)
    text = write_results(runs_dir, ROOT / "compat" / "RESULTS.md", probes_dir=probes_dir,
                         notes=notes.read_text().strip() if notes.exists() else "")
    print(text.split("## Per release")[0].split("## Matrix")[-1])
    return 0
