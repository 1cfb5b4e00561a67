"""``./kvq experiment``: the memory experiment's rows (experiment.py), on your model accuracy and
speed too (your_model.py), the report and the baselines; interrupts keep what finished."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from kvcache_repro.backends import quanto_ext
from kvcache_repro.core import timings
from kvcache_repro.core.provenance import device_label, device_name, package_versions, produced_by
from kvcache_repro.measure import prediction, reserved, scenarios
from kvcache_repro.measure.memory import Measurement
# experiment by module, never its names: a test that patches experiment.run_experiment patches it here
from kvcache_repro.runner import experiment, limits, report, your_model
from kvcache_repro.runner.lanes import default_lanes
from kvcache_repro.runner.progress import Progress
from kvcache_repro.runner.rowstore import RowStore
from kvcache_repro.runner.scenario_choice import (ModelSetupError, check_applicable, choose_scenario,
                                                  model_scenario, seed_checkpoint_problem)
from kvcache_repro.runner.worker import ROOT, RowFailure, RunFailed
from kvcache_repro.verdicts import baseline_file

class Interrupted(KeyboardInterrupt):
    """SIGTERM handled like Ctrl-C: finished rows stay, workers stop."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def fingerprint(scenario: scenarios.Scenario, checkpoint: str | None) -> dict:
    """What rows of one table share: the scenario's settings, the checkpoint, the versions, the
    device's name and the allocator's settings (a CUDA peak depends on both)."""
    return {"scenario": json.loads(json.dumps(dataclasses.asdict(scenario))), "checkpoint": checkpoint,
            "versions": package_versions(), "device": device_name(scenario.device),
            "allocator": {name: os.environ.get(name, "") for name in reserved.CONF_ENVS}}


def _said(error, code: int) -> int:
    print(f"kvq: {error}", file=sys.stderr)
    return code


def _timings(args, scenario, store: RowStore, wall: float, lanes: int, complete: bool) -> None:
    """Each row's wall seconds (worker start to result) and the run's, beside the recorded ones;
    recorded (--record-timings) only from a whole run of every row that measured."""
    seconds = {f"{backend} b{batch}": w for (backend, batch), w in store.walls().items()}
    produced = produced_by(device_label(scenario.device), "./kvq experiment --record-timings",
                           {"lanes": lanes, "resumed": bool(args.resume)})
    whole = complete and not args.resume
    print("\n" + "\n".join(timings.keep(f"experiment {scenario.name}", {**seconds, timings.TOTAL: wall}, produced,
                                         args.record_timings and whole)))
    if args.record_timings and not whole:
        print("timings NOT recorded: only a whole run (no --resume) with every row measured is recorded")


def command(args) -> int:
    """``./kvq experiment`` with its parsed arguments: the exit code."""
    started = time.monotonic()
    try:
        scenario = (model_scenario(args) if args.model else
                    scenarios.get(args.scenario) if args.scenario else choose_scenario(args.checkpoint))
    except ModelSetupError as error:
        return _said(error, 2)
    check_applicable(args, scenario)
    if args.checkpoint and (problem := seed_checkpoint_problem(args.checkpoint)):
        return _said(problem, 2)
    try:
        quanto_ext.check_locks()  # before any worker: one clear message, not a hang per row
    except quanto_ext.StaleLockError as error:
        return _said(error, 3)
    print(f"scenario {scenario.name}: {scenario.notes}")
    print(f"  backends {', '.join(scenario.backends)}; batches {scenario.batch_sizes}; "
          f"{scenario.new_tokens} new tokens"
          f"{''.join(f' ({n} at batch {b})' for b, n in scenario.new_tokens_at)}; G {scenario.settings.q_group_size}, "
          f"residual {scenario.settings.residual_length}")
    out_dir = Path(args.output_dir) if args.output_dir else ROOT / "results" / scenario.name
    store = RowStore(out_dir, fingerprint(scenario, args.checkpoint))
    done: list[Measurement] = []
    if args.resume:
        try:
            done = store.resume()
        except Exception as error:  # ResumeError: rows of another setup are never mixed in
            return _said(error, 2)
        print(f"  resuming: {len(done)} of {len(experiment.planned_rows(scenario))} rows already measured "
              f"in {store.path}")
    elif store.path.exists():
        print(f"  {store.path} from an earlier run is replaced as rows finish (--resume keeps its rows)")
    lanes = args.lanes or default_lanes(scenario, args.in_process)
    if not args.in_process:
        print(f"  each row in a fresh process, time limit "
              f"{args.worker_timeout or limits.worker_seconds(scenario):.0f} s (limits.py)"
              + (f"; {lanes} rows at once, one core each (exact bytes do not depend on it; gen s is each "
                 f"row's own wall time beside the others, information only)" if lanes > 1 else ""))
    progress = Progress(experiment.planned_rows(scenario), store.walls(), log=lambda line: print(line, flush=True),
                        lanes=lanes)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        run = experiment.run_experiment(scenario, args.checkpoint, in_process=args.in_process, done=done, store=store,
                             progress=progress, timeout=args.worker_timeout, logs_dir=out_dir / "logs",
                             lanes=lanes)
        answer = your_model.complete(run, scenario, args.text) if args.model else None  # minutes: interruptible
    except KeyboardInterrupt as interrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the partial outputs
        return _interrupted(args, scenario, store, out_dir, interrupt)
    except RunFailed as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed_yours = answer is not None and bool(answer.failures)  # a backend's accuracy or speed not measured
    print()
    print(report.table(scenario, run.measurements, run.ratios, run.verdicts, run.failures))
    if scenario.arch == "seed-geometry":
        print("\n".join(["", *prediction.lines(scenario, run.measurements)]))
    paths = report.write_outputs(out_dir, scenario, run.measurements, run.ratios, run.verdicts, run.failures)
    if answer is not None:
        paths += your_model.report(out_dir, scenario, run.measurements, answer, log=print)
    for path in paths:
        print(f"wrote {path}")
    for source in sorted({v.source for v in run.verdicts if v.status == "recorded"}):  # a first run, as
        n = sum(v.status == "recorded" and v.source == source for v in run.verdicts)  # pytest-regressions does
        print(f"first run: {n} baseline entries recorded in {source}; later runs compare with them "
              f"(commit the file to keep them)")
    _timings(args, scenario, store, time.monotonic() - started, lanes, complete=not run.failures)
    if not (args.update_baselines or args.record_missing_baselines):
        return 0 if all(v.passed for v in run.verdicts) and not run.failures and not failed_yours else 1
    try:
        lines = experiment.update_baselines(scenario, run.measurements, run.ratios, run_failed=bool(run.failures or failed_yours),
                                 reset_tolerance=args.reset_tolerances,
                                 only_missing=args.record_missing_baselines)
    except baseline_file.BaselineError as error:
        print(f"baselines NOT updated: {error}", file=sys.stderr)
        return 1
    for line in lines or ["nothing missing, nothing written"]:
        print(f"baseline {scenario.name}: {line}")
    # an update rewrites every entry; recording the missing ones leaves a stored entry's verdict standing
    kept = [] if args.update_baselines else [v for v in run.verdicts if not v.passed and v.status != "missing"]
    return 0 if not run.failures and not failed_yours and not kept else 1


def _interrupted(args, scenario, store: RowStore, out_dir: Path, interrupt) -> int:
    """Finished rows are in rows.json already: write the partial table, say how to finish.
    Baselines are never written from a partial run."""
    rows = store.rows.values()
    measured = [Measurement.from_dict(r["measurement"]) for r in rows if r["status"] == "measured"]
    failures = [RowFailure.from_dict(r["failure"]) for r in rows if r["status"] == "failed"]
    missing = [row for row in experiment.planned_rows(scenario) if row not in store.rows]
    signum = getattr(interrupt, "signum", signal.SIGINT)
    print(f"\ninterrupted ({signal.Signals(signum).name}): {len(measured)} of {len(experiment.planned_rows(scenario))} "
          f"rows measured, kept in {store.path}; "
          f"not measured: {', '.join(f'{b}/b{n}' for b, n in missing) or 'none'}", flush=True)
    try:
        found = experiment.ratios(measured, scenario.baseline_metrics, max(scenario.batch_sizes))
        verdicts = experiment._verdicts(scenario, measured, found, failures, missing)
        for path in report.write_outputs(out_dir, scenario, measured, found, verdicts, failures, missing):
            print(f"wrote {path} (partial)")
    except Exception as error:  # the rows are safe; a table is a convenience
        print(f"partial table not written: {type(error).__name__}: {error}")
    command = " ".join(["./kvq experiment", *scenarios.command_args(scenario), "--output-dir", str(out_dir),
                        "--resume",
                        *(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                        *(["--in-process"] if args.in_process else [])])
    print(f"baselines untouched. To finish: {command}", flush=True)
    return 128 + int(signum)
