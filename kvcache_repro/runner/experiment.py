"""The memory experiment: every (backend, batch) of a scenario in a fresh subprocess,
ratios to the unquantized run, comparison with stored baselines, the report.

``./kvq experiment`` runs the scenario this machine can run, or your model's (scenario_choice.py).
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

from kvcache_repro.backends import generation
from kvcache_repro.core.metrics import LARGE_BATCH_ONLY, REFERENCE_METRICS, default_tolerance
from kvcache_repro.core.provenance import device_label, produced_by
from kvcache_repro.measure import memory, reserved, scenarios
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.runner import limits
from kvcache_repro.runner.lanes import Lanes, longest_first
from kvcache_repro.runner.progress import Progress
from kvcache_repro.runner.rowstore import RowStore
# ROOT, RunFailed, run_one: this module's API to its callers (run_one: measure_rows's default)
from kvcache_repro.runner.worker import ROOT, RowFailed, RowFailure, RunFailed, oom, out_of_memory, run_one  # noqa: F401
from kvcache_repro.verdicts import bands, baseline_file, baseline_update, comparison, paths

MIB = 2**20


class RowNotMeasured(LookupError):
    pass


def measure_in_process(scenario: scenarios.Scenario, backend: str, batch: int, loaded=None) -> Measurement:
    """One measurement in this process, for CPU scenarios: their compared metrics are exact
    bytes of storages created during generate(); a warm-up generate first makes what a first
    call builds and keeps. ``loaded``: the scenario's (model, tokenizer)."""
    model, tokenizer = loaded or memory.load_model(scenario)
    ids, mask = memory.make_inputs(scenario, tokenizer, 1)
    generation.generate(model, ids, memory.BACKENDS[backend], scenario.settings, 2, attention_mask=mask,
                        keep_scores=False)
    return memory.measure(scenario, backend, batch, model, tokenizer)


def planned_rows(scenario: scenarios.Scenario) -> list[tuple[str, int]]:
    return [(backend, batch) for batch in scenario.batch_sizes for backend in scenario.backends]


def measure_rows(scenario: scenarios.Scenario, checkpoint: str | None = None, log=print,
                 in_process: bool = False, *, done: list[Measurement] = (), store: RowStore | None = None,
                 progress: Progress | None = None, timeout: float | None = None, logs_dir: Path | None = None,
                 run_one=None, lanes: int | None = None) -> tuple[list[Measurement], list[RowFailure]]:
    """Every (backend, batch) not in ``done``, each in a fresh subprocess (the seed's protocol),
    ``lanes`` at once (lanes.py; default 1), dearest first; or, ``in_process`` (CPU only), one
    after another in this one. A failed row becomes a RowFailure and the others still run; each
    goes to ``store`` at once. An unavailable model ends the run (all would fail). An interrupt
    stops every running worker and keeps what finished."""
    if in_process and scenario.device != "cpu":
        raise ValueError(f"{scenario.name}: in-process runs are for CPU scenarios; "
                         f"CUDA peaks need a fresh process")
    run_one = run_one or globals()["run_one"]
    have = {(m.backend, m.batch) for m in done}
    todo = [row for row in planned_rows(scenario) if row not in have]
    pool = Lanes(1 if in_process else min(lanes or 1, len(todo) or 1), progress)
    todo = longest_first(scenario, todo) if pool.lanes > 1 else todo
    loaded = memory.load_model(scenario) if in_process and todo else None
    measurements, failures = list(done), []
    lock = threading.Lock()

    def row(backend: str, batch: int) -> None:
        if progress:
            progress.begin(backend, batch, None if in_process else
                           (timeout if timeout is not None else limits.worker_seconds(scenario)))
        m = failure = None
        try:
            if in_process:
                try:
                    m = measure_in_process(scenario, backend, batch, loaded)
                except Exception as error:
                    if not out_of_memory(error):
                        raise
                    raise RowFailed(oom(scenario.name, backend, batch, scenario.device, error)) from None
            else:
                m = run_one(scenario.name, backend, batch, checkpoint, timeout=timeout,
                            log_path=None if logs_dir is None else logs_dir / f"{backend}-b{batch}.log",
                            beat=pool.beat)
            said = f"generate {m.generate_seconds:.1f} s, cache {m.metrics['cache_bytes'] / MIB:.2f} MiB"
        except RowFailed as error:
            failure = error.failure
            if "ModelUnavailable" in failure.output_tail:
                raise
            said = f"FAILED ({failure.kind}): {failure.message}"
        wall = progress.end(backend, batch, said) if progress else None
        with lock:
            if not progress:
                log(f"  {backend:>8} b{batch:<4} {said}")
            if failure:
                failures.append(failure)
                if failure.kind != "oom" and failure.output_tail:
                    log("\n".join("      | " + line for line in failure.output_tail.splitlines()))
            else:
                measurements.append(m)
            if store:
                store.add(failure or m, wall)

    pool.run(row, todo)
    order = {row: i for i, row in enumerate(planned_rows(scenario))}
    measurements.sort(key=lambda m: order.get((m.backend, m.batch), len(order)))
    return measurements, failures


@dataclass(frozen=True)
class Ratio:
    backend: str
    batch: int
    metric: str
    value: float  # quantized / none, same batch (a reference metric: none's own value)
    quantized_bytes: int
    none_bytes: int


def _compared(metric: str, batch: int, large: int) -> bool:
    """Whether a quantized row at ``batch`` has a ratio of ``metric``. Peak RSS growth at
    batch 1 is allocator noise (8-10 MiB on cpu, ratios 1.08-1.21): large batch only."""
    return metric not in REFERENCE_METRICS and (metric not in LARGE_BATCH_ONLY or batch == large)


def ratios(measurements: list[Measurement], metrics: tuple[str, ...], large: int | None = None) -> list[Ratio]:
    """``large``: the scenario's largest batch (default: the largest with a none row)."""
    reference = {m.batch: m for m in measurements if m.backend == "none"}
    large = max(reference, default=0) if large is None else large
    out = []
    for m in measurements:
        if m.backend == "none" and "reference_peak_mib" in metrics and "peak_allocated" in m.metrics:
            peak = m.metrics["peak_allocated"]
            out.append(Ratio("none", m.batch, "reference_peak_mib", peak / MIB, peak, MIB))
        elif m.backend != "none" and m.batch in reference:
            for metric in metrics:
                q, n = m.metrics.get(metric), reference[m.batch].metrics.get(metric)
                if _compared(metric, m.batch, large) and q is not None and n:
                    out.append(Ratio(m.backend, m.batch, metric, q / n, q, n))
    return out


def compare_with_baselines(scenario: str, found: list[Ratio], allocator: str | None = None
                           ) -> list[comparison.Verdict]:
    files = [baseline_file.load(p) for p in paths.compared_files(scenario)]
    return [comparison.compare(baseline_file.holder(files, baseline_file.entry_key(r.backend, r.batch, r.metric),
                                                    allocator),
                               r.backend, r.batch, r.metric, r.value, allocator=allocator) for r in found]


def provenance(scenario: scenarios.Scenario, measurements: list[Measurement],
               source: str = baseline_file.UPDATE_COMMAND, **extra) -> dict:
    """A run's produced_by: the device, a checkpoint's model, the settings, ``extra``."""
    model = ({"model": scenario.checkpoint, "weights": "nf4" if scenario.weights_nf4 else "native"}
             if scenario.checkpoint else {})
    return produced_by(
        device_label(scenario.device), source,
        {"new_tokens": scenario.new_tokens, **({"new_tokens_at": {str(b): n for b, n in scenario.new_tokens_at}}
                                               if scenario.new_tokens_at else {}),
         "q_group_size": scenario.settings.q_group_size,
         "residual_length": scenario.settings.residual_length, "dtype": scenario.dtype,
         "prompt_len": {str(m.batch): m.prompt_len for m in measurements},
         "allocator": reserved.run_allocator(scenario.device, measurements)},
        **model, **extra)


def _entry(scenario, r: Ratio, produced: dict) -> baseline_file.Entry:
    """A memory ratio to 4 decimals with its metric's band; your model's accuracy and speed to 6
    digits with the metric's floor (bands.floor: one machine's run, no spread yet)."""
    tolerance = default_tolerance(scenario.device, r.metric)
    if tolerance is not None:
        return baseline_file.Entry(r.backend, r.batch, r.metric, round(r.value, 4), tolerance, produced)
    floor = bands.round_up(bands.floor(r.metric, r.value, r.none_bytes or 1))  # top-1: of its positions
    return baseline_file.Entry(r.backend, r.batch, r.metric, float(f"{r.value:.6g}"), floor, produced)


def update_baselines(scenario: scenarios.Scenario, measurements: list[Measurement], found: list[Ratio],
                     run_failed: bool, reset_tolerance: bool = False,
                     only_missing: bool = False) -> list[str]:
    """Write the measured ratios into the scenario's baseline file; ``only_missing``: only
    those with no stored entry."""
    path = paths.recorded_path(scenario.name)
    if only_missing:
        stored = baseline_file.load(path).entries
        found = [r for r in found if baseline_file.entry_key(r.backend, r.batch, r.metric) not in stored]
        if not found:
            return []
    produced = provenance(scenario, measurements)
    entries = [_entry(scenario, r, produced) for r in found]
    path.parent.mkdir(parents=True, exist_ok=True)  # baselines/models/ for a user's first model
    return baseline_update.update(path, entries, run_failed=run_failed, scenario=scenario.name,
                                  description=scenario.notes, reset_tolerance=reset_tolerance,
                                  key=scenario.baseline_key)


@dataclass
class ExperimentRun:
    """A scenario's measurements, ratios, verdicts and failed rows."""

    scenario: scenarios.Scenario
    measurements: list[Measurement]
    ratios: list[Ratio]
    verdicts: list[comparison.Verdict]
    failures: list[RowFailure] = field(default_factory=list)
    answer: object = None  # your model's accuracy and speed (your_model.Answer), after the rows

    def get(self, backend: str, batch: int) -> Measurement:
        for m in self.measurements:
            if m.backend == backend and m.batch == batch:
                return m
        why = next((f.message for f in self.failures if f.backend == backend and f.batch == batch), "not run")
        raise RowNotMeasured(f"{self.scenario.name} {backend}/b{batch} was not measured: {why}")


def _verdicts(scenario, measurements, found, failures, missing=()) -> list[comparison.Verdict]:
    """The verdicts of ``found``, and an "unmeasured" one for every ratio the run did not
    produce: its row failed or never ran, or its batch's unquantized reference did."""
    verdicts = compare_with_baselines(scenario.name, found, reserved.run_allocator(scenario.device, measurements))
    if not scenario.baseline_metrics:
        return verdicts
    why = {row: "interrupted" for row in missing} | {(f.backend, f.batch): f.message for f in failures}
    files = [baseline_file.load(p) for p in paths.compared_files(scenario.name)]
    have = {(m.backend, m.batch) for m in measurements}
    got = {(r.backend, r.batch, r.metric) for r in found}
    for backend, batch in planned_rows(scenario):
        if backend == "none":
            continue
        measured = (backend, batch) in have and ("none", batch) in have
        reason = ("the row or its reference reported no value" if measured else why.get((backend, batch))
                  or f"its reference none/b{batch}: {why.get(('none', batch), 'not measured')}")
        for metric in scenario.baseline_metrics:  # measured: a compared metric the row did not report
            if _compared(metric, batch, max(scenario.batch_sizes)) and (backend, batch, metric) not in got:
                holder = baseline_file.holder(files, baseline_file.entry_key(backend, batch, metric))
                verdicts.append(comparison.unmeasured(holder, backend, batch, metric, reason + (
                    " (no decode step without a re-quantization)" if measured and metric == "decode_step_peak" else "")))
    return verdicts


def record_first_run(scenario: scenarios.Scenario, measurements: list[Measurement], found: list[Ratio],
                     verdicts: list[comparison.Verdict], failures=(), copy: Path | None = None
                     ) -> list[comparison.Verdict]:
    """Write the ratios no file holds (Scenario.records_first_run; a run with no failed row or
    verdict) to paths.recorded_path, each verdict "recorded" naming the file; ``copy``: a copy
    of baselines/ that holds them already (./kvq device-run's), nothing written."""
    missing = {v.key for v in verdicts if v.status == "missing"}
    if (not missing or failures or not scenario.records_first_run
            or any(not v.passed for v in verdicts if v.status != "missing")):
        return verdicts
    where = paths.recorded_path(scenario.name)
    if copy is not None:
        where = copy / where.relative_to(baseline_file.BASELINE_DIR)
    else:
        update_baselines(scenario, measurements, [r for r in found if baseline_file.entry_key(
            r.backend, r.batch, r.metric) in missing], run_failed=False)
    return [dataclasses.replace(v, status="recorded", source=str(where)) if v.key in missing else v
            for v in verdicts]


def run_experiment(scenario: scenarios.Scenario, checkpoint: str | None = None, log=print,
                   in_process: bool = False, **rows) -> ExperimentRun:
    """measure_rows (``rows``: its keywords), then ratios and verdicts."""
    measurements, failures = measure_rows(scenario, checkpoint, log, in_process, **rows)
    found = ratios(measurements, scenario.baseline_metrics, max(scenario.batch_sizes))
    verdicts = record_first_run(scenario, measurements, found, _verdicts(scenario, measurements, found, failures),
                                failures)
    return ExperimentRun(scenario, measurements, found, verdicts, failures)
