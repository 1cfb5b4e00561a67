"""The memory experiment: every (backend, batch) of a scenario in a fresh subprocess,
ratios to the unquantized run, comparison with stored baselines, the report.

``python -m kvcache_repro.experiment`` (what ``./kvq experiment`` runs) picks the
scenario this machine can run: ``seed`` on CUDA when its checkpoint loads, else
``gpu-small``; ``cpu`` without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import baselines, scenarios
from .memory import Measurement
from .worker import RESULT_PREFIX

ROOT = Path(__file__).resolve().parent.parent

# Bands written with new baseline entries. cache_bytes is exact (the ratio of two
# analytic byte counts), and so is peak_allocated on CPU (peak.py: identical bytes in
# repeated runs and at 1 or 2 threads, tests/test_peak.py): 0.1% there is room for
# rounding of the stored ratio, not for noise. On CUDA the peaks carry the allocator's
# block rounding and kernel choices.
DEFAULT_TOLERANCE = {"cache_bytes": 0.001, "peak_rss_growth": 0.15, "reserved_after": 0.05,
                     "peak_reserved": 0.05, "peak_allocated": 0.05}
EXACT_ON_CPU = frozenset({"cache_bytes", "peak_allocated"})


def default_tolerance(device: str, metric: str) -> float:
    return DEFAULT_TOLERANCE["cache_bytes"] if device == "cpu" and metric in EXACT_ON_CPU else DEFAULT_TOLERANCE[metric]


class RunFailed(RuntimeError):
    pass


def run_one(scenario: str, backend: str, batch: int, checkpoint: str | None = None,
            timeout: float = 3600, env: dict | None = None) -> Measurement:
    """One measurement in a fresh Python process."""
    cmd = [sys.executable, "-m", "kvcache_repro.worker", scenario, backend, str(batch)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    for line in reversed(proc.stdout.splitlines()):
        if proc.returncode == 0 and line.startswith(RESULT_PREFIX):
            return Measurement.from_dict(json.loads(line[len(RESULT_PREFIX):]))
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise RunFailed(f"{scenario}/{backend}/b{batch} failed (exit {proc.returncode}):\n{tail}")


def measure_in_process(scenario: scenarios.Scenario, backend: str, batch: int, loaded=None) -> Measurement:
    """One measurement in this process, for CPU scenarios whose compared metrics are
    exact bytes (peak_allocated, cache_bytes): the tracker counts only storages created
    during generate(), so what the process did before does not enter - except tensors a
    first call creates and keeps (lazily built buffers), which a short warm-up generate
    creates first. Peak RSS is then not "this run" and stays information only.
    ``loaded``: the scenario's (model, tokenizer), to build it once per scenario."""
    from . import generation, memory

    model, tokenizer = loaded or memory.load_model(scenario)
    ids, mask = memory.make_inputs(scenario, tokenizer, 1)
    generation.generate(model, ids, memory.BACKENDS[backend], scenario.settings, 2, attention_mask=mask,
                        keep_scores=False)
    return memory.measure(scenario, backend, batch, model, tokenizer)


def run_scenario(scenario: scenarios.Scenario, checkpoint: str | None = None, log=print,
                 in_process: bool = False) -> list[Measurement]:
    """Every (backend, batch): each in a fresh subprocess (the seed's protocol: a fresh
    kernel per backend), or with ``in_process`` (CPU only) in this one."""
    if in_process and scenario.device != "cpu":
        raise ValueError(f"{scenario.name}: in-process runs are for CPU scenarios; CUDA peaks need a fresh process")
    from . import memory

    loaded = memory.load_model(scenario) if in_process else None
    results = []
    for batch in scenario.batch_sizes:
        for backend in scenario.backends:
            m = (measure_in_process(scenario, backend, batch, loaded) if in_process
                 else run_one(scenario.name, backend, batch, checkpoint))
            log(f"  {backend:>8} b{batch:<4} generate {m.generate_seconds:6.1f}s  "
                f"cache {m.metrics['cache_bytes'] / 2**20:9.1f} MiB")
            results.append(m)
    return results


@dataclass(frozen=True)
class Ratio:
    backend: str
    batch: int
    metric: str
    value: float  # quantized / none, same batch
    quantized_bytes: int
    none_bytes: int


# Peak RSS growth at batch 1 is a few MiB of allocator noise (measured 8-10 MiB on the
# cpu scenario, ratios 1.08-1.21): only the large batch's ratio is worth a baseline.
LARGE_BATCH_ONLY = frozenset({"peak_rss_growth"})


def ratios(measurements: list[Measurement], metrics: tuple[str, ...]) -> list[Ratio]:
    reference = {m.batch: m for m in measurements if m.backend == "none"}
    large = max(reference, default=0)
    out = []
    for m in measurements:
        if m.backend == "none" or m.batch not in reference:
            continue
        for metric in metrics:
            if metric in LARGE_BATCH_ONLY and m.batch != large:
                continue
            q, n = m.metrics.get(metric), reference[m.batch].metrics.get(metric)
            if q is not None and n:
                out.append(Ratio(m.backend, m.batch, metric, q / n, q, n))
    return out


def baseline_path(scenario: str) -> Path:
    return baselines.BASELINE_DIR / f"{scenario}.json"


def compare_with_baselines(scenario: str, found: list[Ratio]) -> list[baselines.Verdict]:
    stored = baselines.load(baseline_path(scenario))
    return [baselines.compare(stored, r.backend, r.batch, r.metric, r.value) for r in found]


def package_versions() -> dict[str, str]:
    """The versions a baseline depends on, recorded with it and compared for drift."""
    from importlib.metadata import version

    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "optimum-quanto": version("optimum-quanto"), "hqq": version("hqq")}


def provenance(scenario: scenarios.Scenario, measurements: list[Measurement]) -> dict:
    import platform

    import torch

    device = (torch.cuda.get_device_name(0) if scenario.device == "cuda"
              else f"{os.cpu_count()}-core CPU ({platform.machine()})")
    return {
        "versions": package_versions(),
        "device": device,
        "settings": {"new_tokens": scenario.new_tokens, "q_group_size": scenario.settings.q_group_size,
                     "residual_length": scenario.settings.residual_length, "dtype": scenario.dtype,
                     "prompt_len": {str(m.batch): m.prompt_len for m in measurements},
                     "allocator": "glibc default" if scenario.device == "cpu" else "PyTorch caching allocator"},
        "date": datetime.date.today().isoformat(),
        "source": "./kvq experiment --update-baselines",
    }


def update_baselines(scenario: scenarios.Scenario, measurements: list[Measurement], found: list[Ratio],
                     run_failed: bool, reset_tolerance: bool = False) -> list[str]:
    produced_by = provenance(scenario, measurements)
    entries = [baselines.Entry(r.backend, r.batch, r.metric, round(r.value, 4),
                               default_tolerance(scenario.device, r.metric), produced_by)
               for r in found]
    return baselines.update(baseline_path(scenario.name), entries, run_failed=run_failed,
                            scenario=scenario.name, description=scenario.notes, reset_tolerance=reset_tolerance)


def choose_scenario(checkpoint: str | None = None) -> scenarios.Scenario:
    """The scenario this machine can run: seed (CUDA, checkpoint loads), gpu-small (CUDA),
    cpu otherwise."""
    import torch

    if not torch.cuda.is_available():
        return scenarios.get("cpu")
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1])",
         checkpoint or scenarios.SEED_CHECKPOINT], capture_output=True, text=True, cwd=ROOT)
    return scenarios.get("seed" if probe.returncode == 0 else "gpu-small")


def main(argv=None) -> int:
    from . import report

    parser = argparse.ArgumentParser(prog="./kvq experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=list(scenarios.SCENARIOS), default=None,
                        help="default: the one this machine can run (seed / gpu-small / cpu)")
    parser.add_argument("--checkpoint", default=None, help="another checkpoint or local path for `seed`")
    parser.add_argument("--reset-tolerances", action="store_true",
                        help="with --update-baselines: write default bands even where an entry has one")
    parser.add_argument("--update-baselines", action="store_true",
                        help="rewrite the baseline entries this run measured (refused if a run failed)")
    parser.add_argument("--output-dir", default=None,
                        help="write results.json, results.md and memory.png here (default results/<scenario>)")
    args = parser.parse_args(argv)

    scenario = scenarios.get(args.scenario) if args.scenario else choose_scenario(args.checkpoint)
    print(f"scenario {scenario.name}: {scenario.notes}")
    print(f"  backends {', '.join(scenario.backends)}; batches {scenario.batch_sizes}; "
          f"{scenario.new_tokens} new tokens; G {scenario.settings.q_group_size}, residual {scenario.settings.residual_length}")
    try:
        run = run_experiment(scenario, args.checkpoint)
    except RunFailed as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    print()
    print(report.table(scenario, run.measurements, run.ratios, run.verdicts))
    if scenario.arch == "seed-geometry":
        from . import prediction

        print("\n".join(["", *prediction.lines(scenario, run.measurements)]))
    out_dir = Path(args.output_dir) if args.output_dir else ROOT / "results" / scenario.name
    for path in report.write_outputs(out_dir, scenario, run.measurements, run.ratios, run.verdicts):
        print(f"wrote {path}")
    if args.update_baselines:
        for line in update_baselines(scenario, run.measurements, run.ratios, run_failed=False,
                                     reset_tolerance=args.reset_tolerances):
            print(f"baseline {scenario.name}: {line}")
        return 0
    return 0 if all(v.passed for v in run.verdicts) else 1



@dataclass
class ExperimentRun:
    """A scenario's measurements with their ratios and baseline verdicts."""

    scenario: scenarios.Scenario
    measurements: list[Measurement]
    ratios: list[Ratio]
    verdicts: list[baselines.Verdict]

    def get(self, backend: str, batch: int) -> Measurement:
        return next(m for m in self.measurements if m.backend == backend and m.batch == batch)


def run_experiment(scenario: scenarios.Scenario, checkpoint: str | None = None, log=print,
                   in_process: bool = False) -> ExperimentRun:
    measurements = run_scenario(scenario, checkpoint, log, in_process)
    found = ratios(measurements, scenario.baseline_metrics)
    return ExperimentRun(scenario, measurements, found, compare_with_baselines(scenario.name, found))


if __name__ == "__main__":
    sys.exit(main())
