"""Checking releases of every package the result depends on: ``./kvq compat SPEC ...``
(``python -m kvcache_repro compat SPEC ...``) runs the CPU tier's version-sensitive test
groups against each spec (package_specs.py: a transformers release, ``torch==2.14.1``,
``optimum-quanto==X``, ``hqq==Y``, a combination, or a local pre-release build) in its own
cached environment (compat_envs.py) and stores one JSON per spec in compat/runs/
(results.py writes compat/RESULTS.md from them); EXIT_CODES say whether a release broke
something.

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
from pathlib import Path

from kvcache_repro.verdicts.tags import BEHAVIOUR_TAG, HARNESS_TAG

# packaging is imported where versions are compared: ./kvq compat --help lists the groups
# with a bare python3, before the venv exists (kvcache_repro/commands/compat.py).

ROOT = Path(__file__).resolve().parents[2]
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
PYTEST = ("-m", "pytest", "-m", MARKERS, "-q", "-p", "no:cacheprovider", "-p", "no:randomly")  # in a spec's env
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


# What ``./kvq compat`` exits with (its --help lists them): a scheduled job goes red on 1 and 3.
EXIT_CODES = {
    0: "every row passes; a value that legitimately changed passes once accepted for its release "
       "range (--accept: a per-release band; an expectation range of verdicts/expectations.py)",
    1: "a row has a new band, behaviour or unclassified failure, decodes slower than the pin, or ran no tests",
    2: "a spec cannot be read, or --latest cannot ask the package index",
    3: "the suite cannot drive a release (it does not install, a harness skip, the speed workers "
       "failed) and no row has a failure of 1",
}


def row_problems(run: dict) -> tuple[str, ...]:
    """What makes a stored run not pass: its failure kinds, "speed" (slower than the pin),
    "no tests" (pytest ran nothing) or "harness" (it cannot install, a speed worker failed)."""
    if not run["installed"]:
        return ("harness",)
    found = [c["kind"] for c in run["cases"] if c["kind"]]
    if not run["cases"]:
        found.append("no tests")
    elif run.get("pytest_rc") not in (None, 0) and not found:  # e.g. an INTERNALERROR after the junit
        found.append("harness")
    speed = run.get("speed") or {}
    if "error" in speed:
        found.append("harness")
    elif any(v["verdict"] == "slower" for v in speed.get("verdicts", {}).values()):
        found.append("speed")
    return tuple(dict.fromkeys(found))


def exit_code(runs: list[dict]) -> int:
    """EXIT_CODES for the runs of one invocation: 1 beats 3 (a regression is never hidden
    behind a release the suite could not drive)."""
    found = {kind for run in runs for kind in row_problems(run)}
    if found - {"harness"}:
        return 1
    return 3 if found else 0


def summarize(version: str, cases: list[dict], *, installed: bool = True, install_error: str = "",
              versions: dict | None = None, seconds: float = 0.0, groups_run: tuple[str, ...] = (),
              date: str = "", pytest_rc: int | None = None) -> dict:
    return {"release": version, "installed": installed, "install_error": install_error,
            "versions": versions or {}, "seconds": round(seconds, 1), "groups_run": list(groups_run),
            "date": date, "pytest_rc": pytest_rc, "cases": cases}


def full_tier(run: dict) -> bool:
    return WHOLE in run.get("groups_run", ())


def run_file(run: dict) -> str:
    """compat/runs/V.json for the groups, V-full.json for the whole tier (both kept)."""
    return run["release"] + ("-full" if full_tier(run) else "") + ".json"


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
    cmd = [str(env.python), *PYTEST, f"--junitxml={junit}", *(f"tests/{g}.py" for g in groups or ())]
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



def accept_spec(spec, run: dict | None, root: Path = ROOT, log=print) -> int:
    """``./kvq compat --accept SPEC``: what the spec's stored run found changed, accepted for
    its release: each behaviour miss that names a table value (and each pinned bug that no
    longer shows) as a new range of verdicts/expectations.py's table from that release on
    (expectations.accept), each band miss measured again in the spec's environment and stored
    as that release line's value (pytest --kv-accept-release); bands first, so a failed
    re-measure writes nothing. Refuses (1) a run with any other problem, a behaviour
    observation that is no table value, of another package or observed two ways, and the
    pin; (2) a spec that is not one package's release."""
    from kvcache_repro.core import provenance
    from kvcache_repro.releases import package_specs
    from kvcache_repro.verdicts import expectations

    if len(spec.items) != 1 or not spec.items[0].version:
        log(f"kvq compat --accept {spec.text}: a value belongs to one release of one package: give a spec "
            "that swaps one package for a release (5.26.0, torch==2.15.0, ...)")
        return 2
    if run is None:
        log(f"kvq compat --accept {spec.text}: no stored run in compat/runs/: run ./kvq compat {spec.text} first")
        return 2
    package, release = spec.items[0].package, spec.items[0].version
    produced = provenance.produced_by(provenance.device_label("cpu"), "./kvq compat --accept", versions=run["versions"])
    found = [(c, expectations.accepted_from_message(c["message"], run["versions"], produced))
             for c in run["cases"] if c["kind"] == "behaviour"]
    records = {(a.behaviour, a.key, a.package, a.release): a for _, a in found if a}
    others = [p for p in row_problems(run) if p not in ("band", "behaviour")]
    others += [f"{c['group']}::{c['name']} ({c['kind']})" for c in run["cases"] if c["kind"] not in (None, "band", "behaviour")]
    others += [f"{c['group']}::{c['name']} (behaviour, observed no table value)" for c, a in found if a is None]
    for a in (a for _, a in found if a):
        name, kept = a.behaviour + (f"[{a.key}]" if a.key else ""), records[(a.behaviour, a.key, a.package, a.release)]
        if kept.value != a.value:
            others.append(f"{name} observed both {a.value!r} and {kept.value!r}")
        elif (a.package, a.release) != (package, release):  # a table of another package moved
            others.append(f"{name}: a behaviour of {a.package} {a.release}, not of {package} {release}")
    pins = package_specs.pinned(root)
    if release == pins.get(package, "").split("+")[0]:
        others.append(f"{package} {release} is the pin: its values are the baselines' own "
                      "(./kvq experiment --update-baselines) and the reviewed table's")
    bands = [f"tests/{c['group']}.py::{c['name']}" for c in run["cases"] if c["kind"] == "band"]
    others = list(dict.fromkeys(others))
    if others or not (bands or records):
        log(f"kvq compat --accept {spec.text}: refused, only changed values are accepted; "
            + (f"this run has: {'; '.join(others[:8])}{f' and {len(others) - 8} more' if len(others) > 8 else ''}"
               if others else "this run has no band or behaviour miss"))
        return 1
    try:
        expectations.check_accepted(list(records.values()))  # before anything is written
    except ValueError as error:
        log(f"kvq compat --accept {spec.text}: refused: {error}")
        return 1
    if bands and (code := _accept_bands(spec, bands, root, log)):
        return code
    for line in expectations.accept(list(records.values())) if records else []:
        log(f"kvq compat --accept {spec.text}: baselines/{expectations.ACCEPTED_FILE.name}: {line}")
    log(f"kvq compat --accept {spec.text}: rerun ./kvq compat {spec.text}: its row now passes")
    return 0


def _accept_bands(spec, bands: list[str], root: Path, log) -> int:
    """The band tests again in the spec's environment, storing what they miss (0: all written)."""
    from kvcache_repro.releases import compat_envs

    env = compat_envs.spec_env(spec, root)
    if env.python is None:
        log(f"kvq compat --accept {spec.text}: cannot build its environment:\n{env.error}")
        return 3
    cmd = [str(env.python), *PYTEST, "--kv-accept-release", spec.items[0].package, *bands]
    log(f"kvq compat --accept {spec.text}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    said = [line for line in proc.stdout.splitlines() if line.startswith("kv-accept-release:")]
    for line in said or proc.stdout.strip().splitlines()[-15:] + proc.stderr.strip().splitlines()[-5:]:
        log(line)
    written = any("[" + spec.items[0].package in line and "accepted]" in line for line in said)
    return 0 if written and not any("NOT updated" in line or "nothing written" in line for line in said) else 1
