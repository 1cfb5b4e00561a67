"""Decode speed (measure/speed.py) against baselines/speed-cpu-SETUP.json: its verdicts and
its baseline update."""
from __future__ import annotations

import os

from kvcache_repro.core import provenance
from kvcache_repro.measure.speed import SpeedRatio, SpeedSetup, band
from kvcache_repro.verdicts import baseline_file, baseline_update, bands, comparison

# The loose bound: a step between flushes at most LOOSE x the slowest ratio stored for this CPU
# capability (every machine and path of it measured, one core kept busy too), the slowest of all
# where none is stored (loose enough that dequantize_thrice may pass there). Measured 2026-12-07
# (docs/bands.md) on one AVX512 EPYC: its AVX512 paths quanto4 1.36-1.50, hqq4 1.27-1.34; fault
# dequantize_thrice 1.85-2.07 and 1.65-1.83: 1.2 x the slowest sits between.
LOOSE = 1.2
BOUNDED = "between_flushes_time_ratio"


def baseline_path(setup: SpeedSetup):
    return baseline_file.BASELINE_DIR / f"speed-cpu-{setup.name}.json"


def verdicts(setup: SpeedSetup, ratios: dict[str, SpeedRatio]):
    stored = baseline_file.load(baseline_path(setup))
    return [comparison.compare(stored, r.backend, setup.batch, "decode_time_ratio", r.ratio) for r in ratios.values()]


def ceilings(setup: SpeedSetup, capability: str) -> dict[str, tuple[float, str]]:
    """Per backend: (the loose bound, what it was cut from) from the stored spread of its
    between-flushes ratio; backends with no stored spread are left out (the caller says so)."""
    out = {}
    for entry in baseline_file.load(baseline_path(setup)).entries.values():
        if entry.metric != BOUNDED or entry.batch != setup.batch or entry.spread is None:
            continue
        seen = entry.spread.observed
        same = {label: v for label, v in seen.items() if bands.capability_of(label) == capability}
        pool, where = (same, f"{capability} runs") if same else (seen, f"runs of any capability (none on {capability})")
        slowest = max(pool, key=pool.get)
        out[entry.backend] = (LOOSE * pool[slowest],
                              f"{LOOSE} x the slowest of {len(pool)} {where}: {pool[slowest]:.3f} on {slowest}")
    return out


def update_baselines(setup: SpeedSetup, ratios: dict[str, SpeedRatio], run_failed: bool) -> list[str]:
    produced_by = provenance.produced_by(
        f"{os.cpu_count()}-core CPU", "pytest --kv-update-baselines",
        {"batch": setup.batch, "prompt": setup.prompt, "new_tokens": setup.new_tokens,
         "q_group_size": setup.settings.q_group_size, "residual_length": setup.settings.residual_length,
         "rounds": setup.rounds, "timer": "thread CPU time, 1 thread, sum of per-step minima"})
    entries = [baseline_file.Entry(r.backend, setup.batch, "decode_time_ratio", round(r.ratio, 3), band(r),
                                   {**produced_by, "blocks": [round(b, 3) for b in r.blocks]})
               for r in ratios.values()]
    entries += [baseline_file.Entry(r.backend, setup.batch, BOUNDED, round(r.between_flushes, 3),
                                    round(LOOSE * r.between_flushes - r.between_flushes, 3), produced_by)
                for r in ratios.values() if r.between_flushes]
    return baseline_update.update(
        baseline_path(setup), entries, run_failed=run_failed, scenario=f"speed-cpu-{setup.name}",
        description="decode CPU time of each backend / none (sum over steps of the fastest "
                    "interleaved round)")
