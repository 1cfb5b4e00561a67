"""Bands cut from the spread between machines (kvcache_repro/runner/spread.py's runs), written
into the baseline entries with that spread, and what each band catches.

    python -m kvcache_repro bands apply RUN.json ... [--write]

Each entry with observations in the runs gets ``spread.observed`` (the value on each run,
labelled by machine and path, plus the entry's own) and the band ``band(observed, MARGIN,
floor)``. One wider than ``UNBANDED_SHARE`` of what a regression moves catches nothing: it
is reported, not compared (``banded`` false). The measurements: docs/bands.md.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from kvcache_repro.core import metrics, provenance
from kvcache_repro.core.atomic import write_atomic
from kvcache_repro.verdicts import baseline_file

# Margin 2 on the half-range: issue 17's AVX512 machine put hqq2's perplexity ratio at 9.468,
# beyond the 9.450 that this machine's paths alone would have reached. New machines add runs.
MARGIN = 2.0


TIME_RATIOS = ("decode_time_ratio", "between_flushes_time_ratio")


def floor(metric: str, value: float, positions: int) -> float:
    """The smallest band per metric, whatever the spread (measured 2026-12-01, docs/bands.md)."""
    if metric == "top1_agreement":
        return 2 / positions  # whole positions: ATen's default path moved hqq2 by 1, the AVX512 CPU fp8 by 3
    if metric == "kl":
        return 0.03 * abs(value)  # 2x the widest KL spread between paths (fp8, 1.33%)
    if metric in ("logit_error", "logit_error_past_512"):
        return 0.02 * abs(value)  # 2.5x the widest half-range between paths but hqq3's (0.8%, tiny-fp16 hqq8)
    if metric in ("perplexity_ratio", "reference_perplexity"):
        return 0.002 * abs(value)  # 2.5x the widest >= 3-bit spread (hqq3, 0.08%)
    if metric in metrics.EXACT_ON_CPU:
        return 0.001  # the stored ratio's rounding (the same bytes on every path)
    if metric in TIME_RATIOS:  # speed.band's rule for one machine's run-to-run noise
        from kvcache_repro.measure.speed import OVERHEAD_SHARE, REPEATABILITY

        return max(OVERHEAD_SHARE * abs(value - 1), REPEATABILITY)
    return 0.0


# A band wider than half of what a regression moves cannot tell a cache that got 50% worse.
UNBANDED_SHARE = 0.5


def moved(metric: str, value: float) -> float:
    """What a regression moves: KL and top-1 the value, ratios what the cache adds (ratio - 1)."""
    return abs(value - 1) if metric in ("perplexity_ratio", *TIME_RATIOS) else abs(value)


def catches(metric: str, value: float, tol: float, positions: int) -> str:
    """What the band catches, in the quantity a reader thinks in."""
    if metric == "top1_agreement":
        return f"top-1 agreement off by more than {tol * positions:.1f} of {positions} positions"
    if not value and metric not in TIME_RATIOS:  # a KL clamped to 0 on every path: no share of it
        return f"off by more than {tol:.3g} (the value is 0)"
    if metric == "perplexity_ratio":
        over = abs(value - 1)
        share = f" ({tol / over:.1%} of the {over:.3g} the cache adds)" if over > 1e-3 else ""
        return f"perplexity off by more than {tol / value:.2%}{share}"
    if metric in TIME_RATIOS:
        share = tol / max(abs(value - 1), 1e-9)
        return f"decode time off by more than {tol:.3g} x none's ({share:.0%} of the overhead)"
    if metric == "kl":
        return f"KL off by more than {tol / value:.1%}"
    if metric.startswith("logit_error"):
        return f"logit error off by more than {tol / value:.1%}"
    if metric == "reference_perplexity":
        return f"the unquantized model's perplexity off by more than {tol / value:.2%}"
    return f"off by more than {tol / value:.2%} (exact on every path measured)"


def round_up(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits (never narrower than the spread)."""
    if x <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / scale - 1e-9) * scale


def band(observed: dict[str, float], margin: float, floor: float) -> tuple[float, float]:
    """(centre, half-width): the middle of ``observed``, ``margin`` x its half-range, >= ``floor``."""
    lo, hi = min(observed.values()), max(observed.values())
    centre = float(f"{(lo + hi) / 2:.6g}")
    need = max(floor, margin * (hi - lo) / 2, hi - centre, centre - lo)
    return centre, float(f"{round_up(need):.3g}")


def machine_label(produced_by: dict) -> str:
    """How an observation is named in a spread: the recording machine's CPU and path."""
    m = produced_by.get("machine") if isinstance(produced_by, dict) else None
    if not isinstance(m, dict):
        return f"unrecorded machine, {produced_by.get('date', '?') if isinstance(produced_by, dict) else '?'}"
    env = ",".join(f"{k}={v}" for k, v in sorted(m.get("env", {}).items()))
    label = f"{m.get('cpu', '?')} {m.get('torch_capability', '?')} {m.get('threads', '?')}t"
    return label + (f" [{env}]" if env else "")


def capability_of(label: str) -> str:
    """The torch CPU capability in a ``machine_label`` ("AMD EPYC (avx2) AVX2 1t [...]" -> "AVX2"), or ""."""
    m = re.search(r" (\S+) (?:\d+|\?)t(?: |$)", label)  # "?t": threads not recorded
    return m.group(1) if m else ""


def _positions(entry: baseline_file.Entry) -> int:
    """Predicted positions of an accuracy entry's protocol ("rows2-prefill64-decode128" -> 256), or 1."""
    m = re.match(r"rows(\d+)-prefill\d+-decode(\d+)", entry.produced_by.get("settings", {}).get("protocol", ""))
    return int(m.group(1)) * int(m.group(2)) if m else 1


def observed_for(key_prefix: str, entry: baseline_file.Entry, runs: dict[str, dict]) -> dict[str, float]:
    """The entry's value on each run: ``values[<prefix>/<backend>[/b<batch>]/<metric>]``."""
    out = {}
    for label, run in runs.items():
        v = run["values"]
        for key in (f"{key_prefix}/{entry.backend}/{entry.metric}",
                    f"{key_prefix}/{entry.backend}/b{entry.batch}/{entry.metric}"):
            if key in v and v[key] is not None and math.isfinite(v[key]):
                out[label] = float(v[key])
    return out


def run_label(run: dict, name: str) -> str:
    return machine_label({"machine": run.get("machine", {})}) + (f" ({name})" if name else "")


def load_runs(files) -> dict[str, dict]:
    """Runs by machine and path (files of one machine and path are one run: slow tables apart)."""
    runs: dict[str, dict] = {}
    for f in files:
        data = json.loads(Path(f).read_text())
        label = run_label(data, data.get("source", ""))
        if label in runs:
            data = {**runs[label], "values": {**runs[label]["values"], **data["values"]}}
        runs[label] = data
    return runs


def rebanded(entry: baseline_file.Entry, observed: dict[str, float], margin: float = MARGIN,
             recorder: dict | None = None) -> baseline_file.Entry:
    """The entry with its band cut from ``observed`` and what it holds; ``recorder``: the machine."""
    positions = _positions(entry)
    # What the entry holds stays an observation: its spread, or the recording machine's value.
    if entry.spread is not None:
        seen = dict(entry.spread.observed)
    elif entry.metric in metrics.EXACT_ON_CPU:
        seen = {}  # the stored ratio is the recording's value rounded to 4 decimals, not another observation
    else:
        seen = {machine_label(entry.produced_by): entry.ratio}
    seen.update(observed)
    lo, hi = min(seen.values()), max(seen.values())
    fl = float(f"{floor(entry.metric, (lo + hi) / 2, positions):.6g}")  # of the observations, not of what was stored
    centre, tol = band(seen, margin, fl)
    banded = tol <= UNBANDED_SHARE * moved(entry.metric, centre) or entry.metric in metrics.EXACT_ON_CPU
    if banded:
        note = f"catches {catches(entry.metric, centre, tol, positions)}; spread {lo:.6g}..{hi:.6g} on {len(seen)} runs"
    else:
        note = (f"not banded: the {len(seen)} runs span {lo:.6g}..{hi:.6g}, a band of +/- {tol:.3g} would be "
                f"{tol / max(moved(entry.metric, centre), 1e-12):.0%} of what a regression moves")
    spread = baseline_file.Spread(seen, margin, fl, banded, note)
    produced_by = dict(entry.produced_by)
    if recorder is not None:
        produced_by.update(machine=recorder, band="python -m kvcache_repro bands apply (baselines/spread/)")
    return baseline_file.Entry(entry.backend, entry.batch, entry.metric, centre, tol, produced_by,
                               entry.by_release, spread)


def recording_machine(runs: dict[str, dict]) -> dict | None:
    """The machine of the runs on this machine's own path (no knob set): where the bands were cut."""
    here = provenance.cpu_model()
    return next((r["machine"] for r in runs.values()
                 if r.get("machine", {}).get("cpu") == here and not r["machine"].get("env")), None)


# Each baseline file the spread runs cover, and the prefix of its quantities in a run.
FILES = {"accuracy-cpu-core-rows2-prefill64-decode128-G128-R64.json": "accuracy-core",
         "accuracy-cpu-full-rows2-prefill64-decode128-G128-R64.json": "accuracy-full",
         "accuracy-cpu-seed-rows4-prefill64-decode1024-G128-R64.json": "accuracy-seed",
         "cpu-tiny.json": "cpu-tiny", "speed-cpu-tiny.json": "speed-tiny",
         **{f"accuracy-cpu-tiny-{d}-rows2-prefill64-decode1024-G32-R64.json": f"accuracy-tiny-{d}"
            for d in ("fp32", "fp16", "bf16")}}


def apply(runs: dict[str, dict], write: bool, files=FILES) -> list[str]:
    lines = []
    recorder = recording_machine(runs)
    for name, prefix in files.items():
        path = baseline_file.BASELINE_DIR / name
        stored = baseline_file.load(path)
        changed = False
        for key, entry in list(stored.entries.items()):
            if observed := observed_for(prefix, entry, runs):
                changed = True
                stored.entries[key] = new = rebanded(entry, observed, recorder=recorder)
                what = "" if new.spread.banded else " (reported, not banded)"
                lines.append(f"{name} {key}: {entry.ratio:.6g} +/- {entry.tolerance:.3g} -> "
                             f"{new.ratio:.6g} +/- {new.tolerance:.3g}{what}: {new.spread.note}")
        if changed and write:
            text = baseline_file.dumps(stored)
            baseline_file.parse(path, text)  # never write what load would reject
            write_atomic(path, text)
    return lines
