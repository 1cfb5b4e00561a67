"""The seed's table for a run, and its JSON / Markdown / PNG outputs."""
from __future__ import annotations

import json
from pathlib import Path

from .memory import Measurement

MIB = 2**20


def _peak_metric(device: str) -> str:
    return "peak_reserved" if device == "cuda" else "peak_rss"


def rows(scenario, measurements: list[Measurement], found, verdicts) -> list[dict]:
    by_key = {(r.backend, r.batch, r.metric): (r, v) for r, v in zip(found, verdicts)}
    peak = _peak_metric(scenario.device)
    main_metric = "reserved_after" if scenario.device == "cuda" else "peak_rss_growth"
    out = []
    for m in measurements:
        ratio, verdict = by_key.get((m.backend, m.batch, main_metric), (None, None))
        cache_ratio, cache_verdict = by_key.get((m.backend, m.batch, "cache_bytes"), (None, None))
        out.append({
            "backend": m.backend, "batch": m.batch,
            "before_mib": m.before_bytes / MIB, "peak_mib": m.metrics.get(peak, 0) / MIB,
            "allocated_mib": m.metrics.get("peak_allocated", 0) / MIB,
            "main_metric": main_metric, "main_mib": m.metrics.get(main_metric, 0) / MIB,
            "cache_mib": m.metrics["cache_bytes"] / MIB,
            "cache_matches_model": m.metrics["cache_bytes"] == m.predicted_cache_bytes,
            "ratio": None if ratio is None else ratio.value,
            "baseline": None if verdict is None or verdict.stored is None else verdict.stored,
            "verdict": "-" if verdict is None else verdict.status,
            "cache_ratio": None if cache_ratio is None else cache_ratio.value,
            "cache_verdict": "-" if cache_verdict is None else cache_verdict.status,
            "seconds": m.generate_seconds,
            # CUDA: allocated beyond the weights at the peak, less the cache = transient overhead
            "transient_mib": (m.metrics["peak_allocated"] - m.before_bytes - m.metrics["cache_bytes"]) / MIB
            if "peak_allocated" in m.metrics else None,
        })
    return out


def _fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def table(scenario, measurements, found, verdicts) -> str:
    peak = "peak reserved" if scenario.device == "cuda" else "peak RSS"
    main = "reserved after" if scenario.device == "cuda" else "RSS growth"
    header = (f"{'backend':>8} {'batch':>5} {'before MiB':>10} {peak + ' MiB':>17} {main + ' MiB':>15} "
              f"{'ratio':>6} {'baseline':>8} {'verdict':>11} {'cache MiB':>10} {'cache ratio':>11} "
              f"{'cache':>11} {'gen s':>7}" + (f" {'transient MiB':>13}" if scenario.device == "cuda" else ""))
    lines = [header, "-" * len(header)]
    for r in rows(scenario, measurements, found, verdicts):
        lines.append(
            f"{r['backend']:>8} {r['batch']:>5} {r['before_mib']:>10.1f} {r['peak_mib']:>17.1f} {r['main_mib']:>15.1f} "
            f"{_fmt(r['ratio']):>6} {_fmt(r['baseline']):>8} {r['verdict']:>11} {r['cache_mib']:>10.2f} "
            f"{_fmt(r['cache_ratio']):>11} {r['cache_verdict']:>11} {r['seconds']:>7.1f}"
            + (f" {_fmt(r['transient_mib'], '.1f'):>13}" if scenario.device == "cuda" else ""))
    failing = [v for v in verdicts if v.status in ("regression", "improvement")]
    missing = [v for v in verdicts if v.status == "missing"]
    if failing or missing:
        lines.append("")
        lines += [v.message for v in failing]
    if missing:
        lines.append(f"{len(missing)} ratios have no baseline yet ({', '.join(v.key for v in missing)}); "
                     f"add them with ./kvq experiment --update-baselines")
    return "\n".join(lines)


def write_outputs(directory: Path, scenario, measurements, found, verdicts) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"scenario": scenario.name, "notes": scenario.notes,
            "measurements": [m.to_dict() for m in measurements],
            "ratios": [r.__dict__ for r in found],
            "verdicts": [{"key": v.key, "status": v.status, "measured": v.measured, "stored": v.stored,
                          "tolerance": v.tolerance} for v in verdicts]}
    paths = [directory / "results.json", directory / "results.md", directory / "memory.png"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(f"# {scenario.name}\n\n{scenario.notes}\n\n```\n{table(scenario, measurements, found, verdicts)}\n```\n")
    _plot(paths[2], scenario, measurements)
    return paths


def _plot(path: Path, scenario, measurements) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "peak_reserved" if scenario.device == "cuda" else "peak_rss"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for backend in scenario.backends:
        pts = sorted((m.batch, m.metrics.get(metric, 0) / MIB, m.metrics["cache_bytes"] / MIB)
                     for m in measurements if m.backend == backend)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=backend)
    for ax, title in zip(axes, [metric.replace("_", " ") + " (MiB)", "cache bytes (MiB)"]):
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.set_xscale("log")
        ax.legend()
    fig.suptitle(f"{scenario.name}: {scenario.notes}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
