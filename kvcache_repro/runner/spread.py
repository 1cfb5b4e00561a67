"""How much the suite's numbers move between machines: every stored quantity measured
under each CPU code path a machine may take, so that bands are cut from that spread and
not from one machine's repeatability.

One machine reaches most of what others do by steering the kernel choice (``PATHS``: torch's
vector code, oneDNN's and MKL's ISA, the thread count), each path in a fresh process, one
after another. Measured: what the suite stores or asserts with a numeric margin (``PARTS``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kvcache_repro.core.atomic import write_atomic
from kvcache_repro.core.provenance import KNOBS, machine, package_versions

# The knobs (provenance.KNOBS) each path sets; "own": none (the machine's best path).
PATHS: dict[str, dict[str, str]] = {
    "own": {},
    "own-2threads": {"KVQ_TORCH_THREADS": "2"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-default-2threads": {"ATEN_CPU_CAPABILITY": "default", "KVQ_TORCH_THREADS": "2"},
    "onednn-sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "mkl-sse42": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def _accuracy(setup: str = "core") -> dict[str, float]:
    from kvcache_repro.runner import accuracy_runs

    table = accuracy_runs.run_accuracy("cpu", setup)
    out = {f"accuracy-{setup}/{name}/{metric}": value for name, metric, value in table.metric_values()}
    out[f"accuracy-{setup}/none/reference_perplexity"] = table.reference_perplexity
    for name, q in table.results.items():
        out[f"accuracy-{setup}/{name}/perplexity"] = q.perplexity
    return out


def _memory() -> dict[str, float]:
    from kvcache_repro.runner import experiment
    from kvcache_repro.measure import scenarios

    run = experiment.run_experiment(scenarios.get("cpu-tiny"), log=lambda line: None, in_process=True)
    out = {f"cpu-tiny/{r.backend}/b{r.batch}/{r.metric}": r.value for r in run.ratios}
    for m in run.measurements:
        for metric in ("peak_allocated", "cache_bytes"):
            if metric in m.metrics:
                out[f"cpu-tiny/{m.backend}/b{m.batch}/{metric}_bytes"] = m.metrics[metric]
    return out


def _speed() -> dict[str, float]:
    from kvcache_repro.measure import speed

    setup = speed.SPEED_SETUPS["tiny"]
    out = {}
    for name, r in speed.measure_in_fresh_process(setup).items():
        out[f"speed-tiny/{name}/b{setup.batch}/decode_time_ratio"] = r.ratio
        out[f"speed-tiny/{name}/b{setup.batch}/between_flushes_time_ratio"] = r.between_flushes
    return out


# The default parts take ~3 min a path (accuracy-tiny 16-36 s of it); the tables "full" (~5 min) and "seed" (~7 min) by name.
PARTS = {"accuracy": _accuracy, "memory": _memory, "speed": _speed,
         "accuracy-tiny": lambda: {k: v for d in ("fp32", "fp16", "bf16") for k, v in _accuracy(f"tiny-{d}").items()},
         "accuracy-full": lambda: _accuracy("full"), "accuracy-seed": lambda: _accuracy("seed")}
DEFAULT_PARTS = ("accuracy", "accuracy-tiny", "memory", "speed")


def measure(parts=DEFAULT_PARTS) -> dict:
    from kvcache_repro.measure import threads

    threads.pin()
    values, seconds = {}, {}
    for part in parts:
        t0 = time.process_time()
        values.update(PARTS[part]())
        seconds[part] = round(time.process_time() - t0, 1)
    return {"machine": machine(), "versions": package_versions(), "cpu_seconds": seconds, "values": values}


def run_paths(out_dir: Path, paths: list[str], parts: list[str], timeout: float = 3600) -> list[Path]:
    """Each path in a fresh process, one after another, its file written when it finishes.
    ``timeout`` per path (the slowest, full + seed under ATen default, took 20 min)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in paths:
        env = {k: v for k, v in os.environ.items() if k not in KNOBS}
        env.update(PATHS[name])
        target = out_dir / f"{name}.json"
        t0 = time.time()
        try:
            rc = subprocess.call([sys.executable, "-m", "kvcache_repro", "spread", "measure", str(target),
                                  "--parts", *parts], env=env, timeout=timeout)
        except subprocess.TimeoutExpired:  # the child is killed; the paths before it are kept
            rc = f"killed after the {timeout:.0f} s limit"
        print(f"spread: {name}: rc={rc} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        if rc == 0:
            written.append(target)
    return written


def table(runs: dict[str, dict]) -> str:
    """Per quantity: the value on each run, min, max and relative spread."""
    lines = ["quantity | " + " | ".join(runs) + " | rel. spread"]
    for k in sorted({k for r in runs.values() for k in r["values"]}):
        vals = [r["values"].get(k) for r in runs.values()]
        got = [v for v in vals if v is not None]
        lo, hi = min(got), max(got)
        rel = (hi - lo) / abs(lo) if lo else float(hi != lo)
        lines.append(f"{k} | " + " | ".join("-" if v is None else f"{v:.6g}" for v in vals) + f" | {rel:.2e}")
    return "\n".join(lines)


def command(a) -> int:
    """``python -m kvcache_repro spread`` with its parsed arguments: the exit code."""
    if a.cmd == "measure":
        write_atomic(a.out, json.dumps(measure(a.parts), indent=1, sort_keys=True) + "\n")
    elif a.cmd == "run":
        return 0 if len(run_paths(a.dir, a.paths, a.parts)) == len(a.paths) else 1
    else:
            print(table({f"{f.parent.name}/{f.stem}": json.loads(f.read_text()) for f in a.files}))
    return 0
