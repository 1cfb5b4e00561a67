"""The memory experiment's table, and its JSON / Markdown / PNG outputs.

Each row breaks the peak down as the seed's reserved memory would have held it: weights
(and inputs) + the cache at the end + transient (dequantized copies, requantization
temporaries, per-step concatenations). Peak allocated is exact on CPU (peak.py) and CUDA's
``max_memory_allocated`` on GPU; peak reserved (GPU) and peak RSS (CPU) are shown beside it.
"""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from kvcache_repro.core.atomic import write_atomic
from kvcache_repro.core.provenance import machine
from kvcache_repro.measure import reserved
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.measure.scenarios import command_args

MIB = 2**20
# the stacked parts of a peak: memory.png's bars
PARTS = {"weights + inputs": ("#9e9e9e", lambda m: m.before_bytes),
         "cache at end": ("#1f77b4", lambda m: m.metrics["cache_bytes"]),
         "transient": ("#ff7f0e", lambda m: m.transient_bytes or 0)}


def rows(scenario, measurements: list[Measurement], found, verdicts) -> list[dict]:
    by_key = {(r.backend, r.batch, r.metric): (r, v) for r, v in zip(found, verdicts)}
    pool = "peak_reserved" if scenario.device == "cuda" else "peak_rss"  # the allocator's hold: information
    out = []
    for m in measurements:
        peak_ratio, peak_verdict = by_key.get((m.backend, m.batch, "peak_allocated"), (None, None))
        cache_ratio, cache_verdict = by_key.get((m.backend, m.batch, "cache_bytes"), (None, None))
        peak = m.metrics.get("peak_allocated")
        out.append({
            "backend": m.backend, "batch": m.batch,
            "before_mib": m.before_bytes / MIB,
            "peak_allocated_mib": None if peak is None else peak / MIB,
            "cache_mib": m.metrics["cache_bytes"] / MIB,
            "transient_mib": None if peak is None else m.transient_bytes / MIB,
            "pool_metric": pool,
            "pool_mib": m.metrics.get(pool, 0) / MIB,
            "cache_matches_model": m.metrics["cache_bytes"] == m.predicted_cache_bytes,
            "peak_ratio": peak_ratio and peak_ratio.value,
            "peak_baseline": peak_verdict and peak_verdict.stored,
            "peak_verdict": "-" if peak_verdict is None else peak_verdict.status,
            "cache_ratio": cache_ratio and cache_ratio.value,
            "cache_verdict": "-" if cache_verdict is None else cache_verdict.status,
            "seconds": m.generate_seconds,
            **({"reserved_after_mib": m.metrics.get("reserved_after", 0) / MIB,
                "alloc_retries": m.metrics.get(reserved.ALLOC_RETRIES),
                "saw_tooth": reserved.is_saw_tooth(m.metrics),
                "reserved_explained": reserved.explain(m.metrics)} if scenario.device == "cuda" else {}),
        })
    return out


def _fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def table(scenario, measurements, found, verdicts, failures=(), missing=()) -> str:
    """The breakdown per measured row; then the rows that failed (OOM, timeout, error)
    and those never run (an interrupted run), and every baseline problem."""
    pool = "peak reserved" if scenario.device == "cuda" else "peak RSS (info)"
    header = (f"{'backend':>8} {'batch':>5} {'weights+in MiB':>14} {'cache MiB':>10} {'transient MiB':>13} "
              f"{'peak alloc MiB':>14} {'peak ratio':>10} {'baseline':>8} {'verdict':>11} "
              f"{'cache ratio':>11} {'verdict':>11} {pool + ' MiB':>20} {'gen s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows(scenario, measurements, found, verdicts):
        lines.append(
            f"{r['backend']:>8} {r['batch']:>5} {r['before_mib']:>14.2f} {r['cache_mib']:>10.2f} "
            f"{_fmt(r['transient_mib'], '.2f'):>13} {_fmt(r['peak_allocated_mib'], '.2f'):>14} "
            f"{_fmt(r['peak_ratio']):>10} {_fmt(r['peak_baseline']):>8} {r['peak_verdict']:>11} "
            f"{_fmt(r['cache_ratio']):>11} {r['cache_verdict']:>11} {r['pool_mib']:>20.1f} "
            f"{r['seconds']:>7.1f}")
    lines += [f"{f.backend:>8} {f.batch:>5}  FAILED ({f.kind}): {f.message}" for f in failures]
    if scenario.device == "cuda" and measurements:
        # Reserved memory is what the allocator held, not what the run needed (reserved.py).
        lines += ["", "reserved memory (compared: peak allocated; "
                      "reserved is explained, measure/reserved.py):"]
        lines += [f"  {m.backend}/b{m.batch}: {reserved.explain(m.metrics)}" for m in measurements]
    lines += [f"{b:>8} {n:>5}  not measured (interrupted; rerun with --resume)" for b, n in missing]
    failing = [v.message for v in verdicts if v.status in ("regression", "improvement")]
    unmeasured = ["  " + v.message for v in verdicts if v.status == "unmeasured"]
    no_entry = [v.key for v in verdicts if v.status == "missing"]
    if failing:
        lines += ["", *failing]
    if unmeasured:
        lines += ["", f"{len(unmeasured)} baseline entries could not be measured:", *unmeasured]
    if no_entry:
        record = " ".join(["./kvq experiment", *command_args(scenario), "--record-missing-baselines"])
        lines.append(f"{len(no_entry)} ratios have no baseline yet ({', '.join(no_entry)}); "
                     f"record them with {record}")
    return "\n".join(lines)


def write_outputs(directory: Path, scenario, measurements, found, verdicts, failures=(),
                  missing=()) -> list[Path]:
    """results.json (with the running machine's CPU and code path), results.md, memory.png;
    each written to a temp file and renamed, so an interrupt never leaves half a file."""
    data = {"scenario": scenario.name, "notes": scenario.notes, "machine": machine(),
            "complete": not failures and not missing,
            "measurements": [m.to_dict() for m in measurements],
            "failures": [f.to_dict() for f in failures],
            "not_measured": [f"{b}/b{n}" for b, n in missing],
            "breakdown": rows(scenario, measurements, found, verdicts),
            "ratios": [r.__dict__ for r in found],
            "verdicts": [{"key": v.key, "status": v.status,
                          "measured": None if v.measured != v.measured else v.measured,  # NaN: unmeasured
                          "stored": v.stored, "tolerance": v.tolerance, "basis": v.basis, "reason": v.reason}
                         for v in verdicts]}
    paths = [directory / "results.json", directory / "results.md", directory / "memory.png"]
    write_atomic(paths[0], json.dumps(data, indent=2) + "\n")
    text = table(scenario, measurements, found, verdicts, failures, missing)
    write_atomic(paths[1], f"# {scenario.name}\n\n{scenario.notes}\n\n```\n{text}\n```\n"
                           f"\n![weights, cache and transient at the peak]({paths[2].name})\n")
    if measurements:
        tmp = paths[2].with_name(f".{paths[2].name}.tmp.png")
        plot(tmp, scenario, measurements)
        os.replace(tmp, paths[2])
    return paths


def plot(path: Path, scenario, measurements) -> None:
    """Stacked bars per (batch, backend) whose sum is the peak (PARTS); one panel per batch
    size, since they differ by orders of magnitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({m.batch for m in measurements})
    fig, axes = plt.subplots(1, len(batches), figsize=(max(7.0, 4.5 * len(batches)), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        ms = [m for m in measurements if m.batch == batch]
        bottom = [0.0] * len(ms)
        for label, (color, part) in PARTS.items():
            values = [part(m) / MIB for m in ms]
            ax.bar([m.backend for m in ms], values, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(f"batch {batch}: peak allocated (MiB)")
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(f"{scenario.name}: {scenario.notes}", 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
