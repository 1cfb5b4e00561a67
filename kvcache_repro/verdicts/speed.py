"""Decode speed (measure/speed.py) against baselines/speed-cpu-SETUP.json: its verdicts and
its baseline update."""
from __future__ import annotations

import os

from kvcache_repro.core import provenance
from kvcache_repro.measure.speed import SpeedRatio, SpeedSetup, band
from kvcache_repro.verdicts import baseline_file, baseline_update, comparison


def baseline_path(setup: SpeedSetup):
    return baseline_file.BASELINE_DIR / f"speed-cpu-{setup.name}.json"


def verdicts(setup: SpeedSetup, ratios: dict[str, SpeedRatio]):
    stored = baseline_file.load(baseline_path(setup))
    return [comparison.compare(stored, r.backend, setup.batch, "decode_time_ratio", r.ratio) for r in ratios.values()]


def update_baselines(setup: SpeedSetup, ratios: dict[str, SpeedRatio], run_failed: bool) -> list[str]:
    produced_by = provenance.produced_by(
        f"{os.cpu_count()}-core CPU", "pytest --kv-update-baselines",
        {"batch": setup.batch, "prompt": setup.prompt, "new_tokens": setup.new_tokens,
         "q_group_size": setup.settings.q_group_size, "residual_length": setup.settings.residual_length,
         "rounds": setup.rounds, "timer": "thread CPU time, 1 thread, sum of per-step minima"})
    entries = [baseline_file.Entry(r.backend, setup.batch, "decode_time_ratio", round(r.ratio, 3), band(r),
                                   {**produced_by, "blocks": [round(b, 3) for b in r.blocks]})
               for r in ratios.values()]
    return baseline_update.update(
        baseline_path(setup), entries, run_failed=run_failed, scenario=f"speed-cpu-{setup.name}",
        description="decode CPU time of each backend / none (sum over steps of the fastest "
                    "interleaved round)")
