"""The memory experiment: every (backend, batch) of a scenario in a fresh subprocess,
ratios to the unquantized run, comparison with stored baselines, the report.

``./kvq experiment`` (``python -m kvcache_repro experiment``, kvcache_repro/commands/) picks the
scenario this machine can run: ``seed`` on CUDA when its checkpoint loads (and
bitsandbytes is there for its NF4 weights), else ``gpu-small``; ``cpu`` without a GPU.
``--model ID_OR_DIR`` runs the same protocol on your model instead, with settings of your
choice and baselines of its own (scenarios.model_scenario).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvcache_repro.core import cli
from kvcache_repro.core.provenance import device_label, device_name, package_versions, produced_by
from kvcache_repro.core.metrics import LARGE_BATCH_ONLY, REFERENCE_METRICS, default_tolerance
from kvcache_repro.verdicts import baseline_file, baseline_update, comparison, paths
from kvcache_repro.runner import limits, outcomes
from kvcache_repro.measure import scenarios
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.runner.outcomes import RowFailure
from kvcache_repro.runner.progress import Progress
from kvcache_repro.runner.rowstore import RowStore
from kvcache_repro.runner.worker import FAILED_PREFIX, RESULT_PREFIX

ROOT = Path(__file__).resolve().parents[2]

MIB = 2**20


class RunFailed(RuntimeError):
    pass


class RowFailed(RunFailed):
    """A worker produced no measurement; ``failure`` says why (oom / timeout / error)."""

    def __init__(self, failure: RowFailure):
        text = failure.message
        if failure.output_tail:
            text += "\nlast output of the worker:\n" + failure.output_tail
        super().__init__(text)
        self.failure = failure


TAIL_LINES = 15
KILL_GRACE_S = 5.0  # SIGTERM first (the worker releases what it holds), SIGKILL after this


def _die_with_parent() -> None:
    """In the worker, before exec: a SIGKILLed experiment must not leave it running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """End the worker and everything it started (its own session: ninja, g++)."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(line for line in lines[-TAIL_LINES:] if not line.startswith(RESULT_PREFIX))


def run_one(scenario: str, backend: str, batch: int, checkpoint: str | None = None,
            timeout: float | None = None, env: dict | None = None, log_path: Path | None = None,
            beat=None, beat_every: float = 1.0) -> Measurement:
    """One measurement in a fresh Python process, killed after ``timeout`` seconds
    (default: limits.worker_seconds of the scenario). Raises RowFailed with the worker's
    last output for an OOM, a timeout or an error. ``log_path`` keeps the worker's
    output; ``beat()`` is called about every ``beat_every`` seconds while it runs. An
    interrupt (KeyboardInterrupt) stops the worker before it propagates."""
    limit = timeout if timeout is not None else limits.worker_seconds(scenarios.get(scenario))
    cmd = [sys.executable, "-m", "kvcache_repro.runner.worker", scenario, backend, str(batch)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvq-worker-"))) / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=True, preexec_fn=_die_with_parent)
            start = time.monotonic()
            try:
                while True:
                    left = limit - (time.monotonic() - start)
                    if left <= 0:
                        _stop(proc)
                        raise RowFailed(RowFailure(
                            scenario, backend, batch, "timeout",
                            f"no result after {limit:.0f} s (the time limit; limits.py), worker killed",
                            _tail(log_path)))
                    try:
                        proc.wait(min(left, beat_every))
                        break
                    except subprocess.TimeoutExpired:
                        if beat:
                            beat()
            except BaseException:
                _stop(proc)
                raise
        text = log_path.read_text(errors="replace")
        for line in reversed(text.splitlines()):
            if proc.returncode == 0 and line.startswith(RESULT_PREFIX):
                return Measurement.from_dict(json.loads(line[len(RESULT_PREFIX):]))
            if line.startswith(FAILED_PREFIX):
                raise RowFailed(RowFailure.from_dict(json.loads(line[len(FAILED_PREFIX):])))
        tail = _tail(log_path)
        last = tail.splitlines()[-1] if tail else "no output"
        raise RowFailed(RowFailure(scenario, backend, batch, "error", f"exit {proc.returncode}: {last}", tail))


def measure_in_process(scenario: scenarios.Scenario, backend: str, batch: int, loaded=None) -> Measurement:
    """One measurement in this process, for CPU scenarios whose compared metrics are
    exact bytes (peak_allocated, cache_bytes): the tracker counts only storages created
    during generate(), so what the process did before does not enter - except tensors a
    first call creates and keeps (lazily built buffers), which a short warm-up generate
    creates first. Peak RSS is then not "this run" and stays information only.
    ``loaded``: the scenario's (model, tokenizer), to build it once per scenario."""
    from kvcache_repro.backends import generation
    from kvcache_repro.measure import memory

    model, tokenizer = loaded or memory.load_model(scenario)
    ids, mask = memory.make_inputs(scenario, tokenizer, 1)
    generation.generate(model, ids, memory.BACKENDS[backend], scenario.settings, 2, attention_mask=mask,
                        keep_scores=False)
    return memory.measure(scenario, backend, batch, model, tokenizer)


def planned_rows(scenario: scenarios.Scenario) -> list[tuple[str, int]]:
    return [(backend, batch) for batch in scenario.batch_sizes for backend in scenario.backends]


def measure_rows(scenario: scenarios.Scenario, checkpoint: str | None = None, log=print, in_process: bool = False,
                 *, done: list[Measurement] = (), store: RowStore | None = None, progress: Progress | None = None,
                 timeout: float | None = None, logs_dir: Path | None = None,
                 run_one=None) -> tuple[list[Measurement], list[RowFailure]]:
    """Every (backend, batch) not in ``done``: each in a fresh subprocess (the seed's
    protocol: a fresh kernel per backend), or with ``in_process`` (CPU only) in this one.
    A row that fails (out of memory, over its time limit, an error) becomes a
    RowFailure and the others are still measured; each finished row goes to ``store``
    at once. An unavailable model ends the run (every row would fail the same way)."""
    if in_process and scenario.device != "cpu":
        raise ValueError(f"{scenario.name}: in-process runs are for CPU scenarios; CUDA peaks need a fresh process")
    from kvcache_repro.measure import memory

    run_one = run_one or globals()["run_one"]
    have = {(m.backend, m.batch) for m in done}
    todo = [row for row in planned_rows(scenario) if row not in have]
    loaded = memory.load_model(scenario) if in_process and todo else None
    measurements, failures = list(done), []
    for backend, batch in todo:
        if progress:
            progress.begin(backend, batch, None if in_process else
                           (timeout if timeout is not None else limits.worker_seconds(scenario)))
        try:
            if in_process:
                try:
                    m = measure_in_process(scenario, backend, batch, loaded)
                except torch_oom() as error:
                    raise RowFailed(outcomes.oom(scenario.name, backend, batch, scenario.device, error)) from None
            else:
                m = run_one(scenario.name, backend, batch, checkpoint, timeout=timeout,
                            log_path=None if logs_dir is None else logs_dir / f"{backend}-b{batch}.log",
                            beat=progress.beat if progress else None)
        except RowFailed as error:
            failure = error.failure
            if "ModelUnavailable" in failure.output_tail:
                raise
            failures.append(failure)
            wall = progress.end(backend, batch, f"FAILED ({failure.kind}): {failure.message}") if progress else None
            if not progress:
                log(f"  {backend:>8} b{batch:<4} FAILED ({failure.kind}): {failure.message}")
            if failure.kind != "oom" and failure.output_tail:
                log("\n".join("      | " + line for line in failure.output_tail.splitlines()))
            if store:
                store.add_failure(failure, wall)
            continue
        line = f"generate {m.generate_seconds:.1f} s, cache {m.metrics['cache_bytes'] / 2**20:.2f} MiB"
        wall = progress.end(backend, batch, line) if progress else None
        if not progress:
            log(f"  {backend:>8} b{batch:<4} {line}")
        measurements.append(m)
        if store:
            store.add_measurement(m, wall)
    order = {row: i for i, row in enumerate(planned_rows(scenario))}
    measurements.sort(key=lambda m: order.get((m.backend, m.batch), len(order)))
    return measurements, failures


def torch_oom():
    import torch

    return torch.OutOfMemoryError


def run_scenario(scenario: scenarios.Scenario, checkpoint: str | None = None, log=print,
                 in_process: bool = False) -> list[Measurement]:
    """Every (backend, batch) measured, or RunFailed naming the rows that were not."""
    measurements, failures = measure_rows(scenario, checkpoint, log, in_process)
    if failures:
        raise RunFailed("; ".join(f"{f.key}: {f.message}" for f in failures))
    return measurements


@dataclass(frozen=True)
class Ratio:
    backend: str
    batch: int
    metric: str
    value: float  # quantized / none, same batch (a reference metric: none's own value)
    quantized_bytes: int
    none_bytes: int


# Peak RSS growth at batch 1 is a few MiB of allocator noise (measured 8-10 MiB on the
# cpu scenario, ratios 1.08-1.21): only the large batch's ratio is worth a baseline.


def ratios(measurements: list[Measurement], metrics: tuple[str, ...]) -> list[Ratio]:
    reference = {m.batch: m for m in measurements if m.backend == "none"}
    large = max(reference, default=0)
    out = []
    for m in measurements:
        if m.backend == "none":
            if "reference_peak_mib" in metrics and "peak_allocated" in m.metrics:
                peak = m.metrics["peak_allocated"]
                out.append(Ratio("none", m.batch, "reference_peak_mib", peak / MIB, peak, MIB))
            continue
        if m.batch not in reference:
            continue
        for metric in metrics:
            if metric in REFERENCE_METRICS:
                continue
            if metric in LARGE_BATCH_ONLY and m.batch != large:
                continue
            q, n = m.metrics.get(metric), reference[m.batch].metrics.get(metric)
            if q is not None and n:
                out.append(Ratio(m.backend, m.batch, metric, q / n, q, n))
    return out


def compare_with_baselines(scenario: str, found: list[Ratio]) -> list[comparison.Verdict]:
    stored = baseline_file.load(paths.compared_path(scenario))
    return [comparison.compare(stored, r.backend, r.batch, r.metric, r.value) for r in found]


def unmeasured_verdicts(scenario: scenarios.Scenario, measurements: list[Measurement],
                        why: dict[tuple[str, int], str]) -> list[comparison.Verdict]:
    """A verdict for every ratio the run should have produced and did not: a row that
    failed or was never run (``why`` says which), and every quantized row of a batch whose
    unquantized reference is missing (a ratio needs both)."""
    if not scenario.baseline_metrics:
        return []
    stored = baseline_file.load(paths.compared_path(scenario.name))
    have = {(m.backend, m.batch) for m in measurements}
    large = max(scenario.batch_sizes)
    out = []
    for backend, batch in planned_rows(scenario):
        if backend == "none":
            continue
        if (backend, batch) in have and ("none", batch) in have:
            continue
        reason = why.get((backend, batch)) or f"its reference none/b{batch}: {why.get(('none', batch), 'not measured')}"
        for metric in scenario.baseline_metrics:
            if metric in LARGE_BATCH_ONLY and batch != large or metric in REFERENCE_METRICS:
                continue
            out.append(comparison.unmeasured(stored, backend, batch, metric, reason))
    return out


def provenance(scenario: scenarios.Scenario, measurements: list[Measurement],
               source: str = baseline_file.UPDATE_COMMAND, **extra) -> dict:
    """A run's produced_by: the device, the model (a checkpoint's scenario), the settings;
    ``extra``: the caller's own fields."""
    model = ({"model": scenario.checkpoint, "weights": "nf4" if scenario.weights_nf4 else "native"}
             if scenario.checkpoint else {})
    return produced_by(
        device_label(scenario.device), source,
        {"new_tokens": scenario.new_tokens, "q_group_size": scenario.settings.q_group_size,
         "residual_length": scenario.settings.residual_length, "dtype": scenario.dtype,
         "prompt_len": {str(m.batch): m.prompt_len for m in measurements},
         "allocator": "glibc default" if scenario.device == "cpu" else "PyTorch caching allocator"}, **model, **extra)


def update_baselines(scenario: scenarios.Scenario, measurements: list[Measurement], found: list[Ratio],
                     run_failed: bool, reset_tolerance: bool = False, only_missing: bool = False) -> list[str]:
    """Write the measured ratios into the scenario's baseline file (atomically);
    ``only_missing``: only those with no stored entry, every stored one left as it is."""
    produced = provenance(scenario, measurements)
    if only_missing:
        stored = baseline_file.load(paths.recorded_path(scenario.name)).entries
        found = [r for r in found if baseline_file.entry_key(r.backend, r.batch, r.metric) not in stored]
        if not found:
            return []
    entries = [baseline_file.Entry(r.backend, r.batch, r.metric, round(r.value, 4),
                                   default_tolerance(scenario.device, r.metric), produced)
               for r in found]
    path = paths.recorded_path(scenario.name)
    path.parent.mkdir(parents=True, exist_ok=True)  # baselines/models/ for a user's first model
    return baseline_update.update(path, entries, run_failed=run_failed, scenario=scenario.name,
                                  description=scenario.notes, reset_tolerance=reset_tolerance,
                                  key=scenario.baseline_key)


def choose_scenario(checkpoint: str | None = None, log=print) -> scenarios.Scenario:
    """The scenario this machine can run: seed (CUDA, its checkpoint loads, bitsandbytes
    for its NF4 weights), gpu-small (CUDA otherwise, saying why), cpu without CUDA."""
    import torch

    from kvcache_repro.backends import checkpoints
    from kvcache_repro.backends.model_cache import ModelUnavailable

    if not torch.cuda.is_available():
        return scenarios.get("cpu")
    try:
        checkpoints.probe(checkpoint or scenarios.SEED_CHECKPOINT)
    except ModelUnavailable as error:
        log(f"seed scenario not run: {error}; running gpu-small instead")
        return scenarios.get("gpu-small")
    if not checkpoints.nf4_available():
        log(f"seed scenario not run: its NF4 weights need bitsandbytes ({checkpoints.NF4_FIX}); "
            f"running gpu-small instead")
        return scenarios.get("gpu-small")
    return scenarios.get("seed")


# What makes a checkpoint the seed's model: Llama-3-8B's shapes (offline.ARCHS). Another
# model passed as the seed's would be compared with the seed's ratios and, with
# --update-baselines, overwrite them.
SEED_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "vocab_size")


def not_the_seed_model(config: dict) -> list[str]:
    """How ``config`` differs from the seed model's architecture ([] when it is it)."""
    from kvcache_repro.backends.offline import ARCHS

    seed = ARCHS["llama3-8b"]
    return [f"{k} {config.get(k)} (the seed's: {seed[k]})" for k in SEED_SHAPE_KEYS if config.get(k) != seed[k]]


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a CI timeout, kill) handled like Ctrl-C: finished rows stay, workers stop."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def fingerprint(scenario: scenarios.Scenario, checkpoint: str | None) -> dict:
    """What rows of one table must share: every setting of the scenario, the checkpoint,
    the package versions."""
    import dataclasses

    return {"scenario": json.loads(json.dumps(dataclasses.asdict(scenario))), "checkpoint": checkpoint,
            "versions": package_versions()}


class ModelSetupError(ValueError):
    """--model cannot run as given (cannot load, bad settings): the message says why and how to fix it."""


def model_scenario(args, cuda_available: bool | None = None) -> scenarios.Scenario:
    """The scenario of ``--model`` and its options, registered for the workers; the model's
    config is read first (a child process), so a model that cannot load stops here."""
    from kvcache_repro.backends import caches, checkpoints, matrix
    from kvcache_repro.backends.model_cache import ModelUnavailable

    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda_available else "cpu")
    if device == "cuda" and not cuda_available:
        raise ModelSetupError("--device cuda: no CUDA device here (torch.cuda.is_available() is False); "
                              "run with --device cpu, or on a machine with a GPU")
    cuda = device == "cuda"
    try:
        backends = [b.name for b in matrix.select_backends(args.backends or "none,quanto4,hqq4",
                                                           caches.available_backends())]
        batches = matrix.select_batch_sizes(args.batch_sizes, (1, 200) if cuda else (1, 8))
    except matrix.SelectionError as error:
        raise ModelSetupError(str(error)) from None
    if "none" not in backends:
        raise ModelSetupError("--backends must include none: every ratio is to the unquantized run")
    if args.weights == "nf4" and cuda and not checkpoints.nf4_available():
        raise ModelSetupError(f"--weights nf4 needs bitsandbytes: {checkpoints.NF4_FIX}")
    try:
        config = checkpoints.probe(args.model)
    except ModelUnavailable as error:
        raise ModelSetupError(str(error)) from None
    new_tokens = args.new_tokens or (1000 if cuda else 64)
    dtype = scenarios.DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    try:
        scenario = scenarios.model_scenario(
            args.model, checkpoints.identity(args.model, config), device, device_name(device), backends, batches,
            new_tokens, dtype, args.weights, args.q_group_size, args.residual_length)
    except scenarios.SelectionError as error:
        raise ModelSetupError(str(error)) from None
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size") or 0) // heads
    for name in backends:
        try:  # prompts are padded to a multiple of 8 tokens: 8 for the seed's prompts
            caches.check_quantizable(matrix.BACKENDS[name], scenario.settings, batch=max(batches), kv_heads=kv_heads,
                                     head_dim=head_dim, prompt_len=8, new_tokens=new_tokens)
        except ValueError as error:
            raise ModelSetupError(f"{name} cannot quantize this model's cache: {error}") from None
    return scenarios.register(scenario)


def seed_checkpoint_problem(checkpoint: str) -> str:
    """Why ``checkpoint`` cannot stand in for the seed's model ("" when it can)."""
    from kvcache_repro.backends import checkpoints
    from kvcache_repro.backends.model_cache import ModelUnavailable

    try:
        differs = not_the_seed_model(checkpoints.probe(checkpoint))
    except ModelUnavailable as error:
        return str(error)
    if differs:
        return (f"--checkpoint {checkpoint} is not the seed's model ({'; '.join(differs)}), so the seed's ratios "
                f"(baselines/seed.json) do not apply to it. Run it as your own model, with baselines of its own: "
                f"./kvq experiment --model {checkpoint}")
    return ""


def check_applicable(args, scenario: scenarios.Scenario) -> None:
    """Options the chosen scenario would silently ignore are an error (cli.UsageError)."""
    if args.checkpoint and scenario.model != "checkpoint":
        loads = ", ".join(n for n, s in scenarios.SCENARIOS.items() if s.model == "checkpoint")
        raise cli.UsageError(f"--checkpoint applies to scenarios that load a checkpoint ({loads}); "
                     f"{scenario.name} uses its own model ({scenario.model}). Drop --checkpoint or pass --scenario seed")
    if args.in_process and scenario.device != "cpu":
        raise cli.UsageError(f"--in-process is for CPU scenarios; {scenario.name} runs on {scenario.device}, "
                     f"where peaks need a fresh process per row")
    if args.in_process and args.worker_timeout is not None:
        raise cli.UsageError("--worker-timeout applies to worker processes, not to --in-process")


def command(args) -> int:
    """``./kvq experiment`` with its parsed arguments (kvcache_repro/commands/experiment.py):
    the exit code."""
    from kvcache_repro.backends import quanto_ext
    from kvcache_repro.runner import report

    if args.model:
        try:
            scenario = model_scenario(args)
        except ModelSetupError as error:
            print(f"kvq: {error}", file=sys.stderr)
            return 2
    else:
        scenario = scenarios.get(args.scenario) if args.scenario else choose_scenario(args.checkpoint)
    check_applicable(args, scenario)
    if args.checkpoint:
        if problem := seed_checkpoint_problem(args.checkpoint):
            print(f"kvq: {problem}", file=sys.stderr)
            return 2
    try:
        quanto_ext.check_locks()  # before any worker: one clear message, not a hang per row
    except quanto_ext.StaleLockError as error:
        print(f"kvq: {error}", file=sys.stderr)
        return 3
    print(f"scenario {scenario.name}: {scenario.notes}")
    print(f"  backends {', '.join(scenario.backends)}; batches {scenario.batch_sizes}; "
          f"{scenario.new_tokens} new tokens; G {scenario.settings.q_group_size}, residual {scenario.settings.residual_length}")
    out_dir = Path(args.output_dir) if args.output_dir else ROOT / "results" / scenario.name
    store = RowStore(out_dir, fingerprint(scenario, args.checkpoint))
    done: list[Measurement] = []
    if args.resume:
        try:
            done = store.resume()
        except Exception as error:  # ResumeError: rows of another setup are never mixed in
            print(f"kvq: {error}", file=sys.stderr)
            return 2
        print(f"  resuming: {len(done)} of {len(planned_rows(scenario))} rows already measured in {store.path}")
    elif store.path.exists():
        print(f"  {store.path} from an earlier run is replaced as rows finish (--resume keeps its rows)")
    limit = None if args.in_process else (args.worker_timeout or limits.worker_seconds(scenario))
    if limit:
        print(f"  each row in a fresh process, time limit {limit:.0f} s (limits.py)")
    progress = Progress(planned_rows(scenario), store.walls(), log=lambda line: print(line, flush=True))
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        run = run_experiment(scenario, args.checkpoint, in_process=args.in_process, done=done, store=store,
                             progress=progress, timeout=args.worker_timeout, logs_dir=out_dir / "logs")
    except KeyboardInterrupt as interrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the partial outputs
        return _interrupted(args, scenario, store, out_dir, interrupt)
    except RunFailed as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(report.table(scenario, run.measurements, run.ratios, run.verdicts, run.failures))
    if scenario.arch == "seed-geometry":
        from kvcache_repro.measure import prediction

        print("\n".join(["", *prediction.lines(scenario, run.measurements)]))
    for path in report.write_outputs(out_dir, scenario, run.measurements, run.ratios, run.verdicts, run.failures):
        print(f"wrote {path}")
    if args.update_baselines or args.record_missing_baselines:
        try:
            lines = update_baselines(scenario, run.measurements, run.ratios, run_failed=bool(run.failures),
                                     reset_tolerance=args.reset_tolerances,
                                     only_missing=args.record_missing_baselines)
        except baseline_file.BaselineError as error:
            print(f"baselines NOT updated: {error}", file=sys.stderr)
            return 1
        for line in lines or ["nothing missing, nothing written"]:
            print(f"baseline {scenario.name}: {line}")
        return 0 if not run.failures else 1
    return 0 if all(v.passed for v in run.verdicts) and not run.failures else 1


def _interrupted(args, scenario, store: RowStore, out_dir: Path, interrupt) -> int:
    """Finished rows are in rows.json already; write the partial table beside them and
    say how to finish. Baselines are never written from a partial run."""
    from kvcache_repro.runner import report

    measured = [Measurement.from_dict(r["measurement"]) for r in store.rows.values() if r["status"] == "measured"]
    failures = [RowFailure.from_dict(r["failure"]) for r in store.rows.values() if r["status"] == "failed"]
    missing = [row for row in planned_rows(scenario) if row not in store.rows]
    signum = getattr(interrupt, "signum", signal.SIGINT)
    print(f"\ninterrupted ({signal.Signals(signum).name}): {len(measured)} of {len(planned_rows(scenario))} rows "
          f"measured, kept in {store.path}; not measured: {', '.join(f'{b}/b{n}' for b, n in missing) or 'none'}",
          flush=True)
    try:
        found = ratios(measured, scenario.baseline_metrics)
        why = {row: "interrupted" for row in missing} | {(f.backend, f.batch): f.message for f in failures}
        verdicts = compare_with_baselines(scenario.name, found) + unmeasured_verdicts(scenario, measured, why)
        for path in report.write_outputs(out_dir, scenario, measured, found, verdicts, failures, missing):
            print(f"wrote {path} (partial)")
    except Exception as error:  # the rows are safe; a table is a convenience
        print(f"partial table not written: {type(error).__name__}: {error}")
    command = " ".join(["./kvq experiment", *scenarios.command_args(scenario), "--output-dir", str(out_dir), "--resume",
                        *(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                        *(["--in-process"] if args.in_process else [])])
    print(f"baselines untouched. To finish: {command}", flush=True)
    return 128 + int(signum)


@dataclass
class ExperimentRun:
    """A scenario's measurements with their ratios and baseline verdicts, and the rows
    that could not be measured."""

    scenario: scenarios.Scenario
    measurements: list[Measurement]
    ratios: list[Ratio]
    verdicts: list[comparison.Verdict]
    failures: list[RowFailure] = field(default_factory=list)

    def get(self, backend: str, batch: int) -> Measurement:
        for m in self.measurements:
            if m.backend == backend and m.batch == batch:
                return m
        why = next((f.message for f in self.failures if f.backend == backend and f.batch == batch), "not run")
        raise RowNotMeasured(f"{self.scenario.name} {backend}/b{batch} was not measured: {why}")


class RowNotMeasured(LookupError):
    pass


def run_experiment(scenario: scenarios.Scenario, checkpoint: str | None = None, log=print,
                   in_process: bool = False, **rows) -> ExperimentRun:
    """Measure (``rows``: measure_rows' keywords: done, store, progress, timeout, logs_dir),
    then ratios and verdicts; a row that could not be measured makes its entries
    "unmeasured" verdicts, which fail."""
    measurements, failures = measure_rows(scenario, checkpoint, log, in_process, **rows)
    found = ratios(measurements, scenario.baseline_metrics)
    verdicts = compare_with_baselines(scenario.name, found)
    verdicts += unmeasured_verdicts(scenario, measurements, {(f.backend, f.batch): f.message for f in failures})
    return ExperimentRun(scenario, measurements, found, verdicts, failures)
