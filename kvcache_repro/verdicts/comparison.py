"""A run's values against a baseline file: one ``Verdict`` per entry, its message naming the
file and the fix, and the drift of values recorded with other package versions."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from kvcache_repro.core import metrics, provenance
from kvcache_repro.verdicts.baseline_file import (EDGE_SLACK, RECORD_HINT, UPDATE_HINT, BaselineFile, Entry, entry_key,
                                                  fmt_num, is_number, is_predicted, load)
from kvcache_repro.verdicts.release_ranges import RANGE_HINT
from kvcache_repro.verdicts.tags import BEHAVIOUR_TAG

# The tests that compare a measurement with its stored band: their failure is what
# --kv-update-baselines is for (it does not block an update), and a compat row calls it "band".
BAND_TESTS = frozenset({"test_ratios_within_baseline_bands", "test_accuracy_within_baseline_bands",
                        "test_peak_reserved_ratio_within_the_card_baseline",
                        "test_speed_within_baseline_bands", "test_logit_error_within_baseline_bands",
                        "test_logit_error_past_512_quantized_tokens_within_baseline_bands",
                        "test_decode_step_peak_within_baseline_bands"})


@dataclass(frozen=True)
class Verdict:
    key: str  # backend/b<batch>/<metric>
    measured: float
    stored: float | None
    tolerance: float | None
    # "ok" | "reported" (not banded) | "recorded" (a first run wrote it) | "regression" | "improvement"
    # | "missing" | "unmeasured" | "nonfinite"
    status: str
    source: str = ""  # the baseline file, so a failure says where to look
    reason: str = ""  # "unmeasured": why the run has no value for it (OOM, timeout, ...)
    # which release(s) the stored value belongs to, e.g. "transformers >=5.0.0,<5.19.0 (observed on ...)"
    basis: str = ""
    release_range: str = ""  # the per-release range compared with ("" : the entry's own ratio)
    note: str = ""  # "reported": why the entry is not banded; banded: the spread the band was cut from
    predicted: bool = False  # the stored value is a prediction (runner/gpu_prediction.py), not a measurement

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "reported", "recorded")

    @property
    def message(self) -> str:
        if self.status == "missing":
            where = (f"in {self.source}" if Path(self.source).exists()
                     else f"because the baseline file {self.source} does not exist")
            return (f"{self.key}: measured ratio {fmt_num(self.measured)}; no stored entry for "
                    f"this key {where} - record it with {RECORD_HINT}")
        if self.status == "recorded":
            return (f"{self.key}: measured ratio {fmt_num(self.measured)}; no stored entry: this first run recorded "
                    f"it in {self.source} (later runs compare with it; commit the file to keep it)")
        if self.status == "reported":
            return (f"{self.key}: measured {fmt_num(self.measured)}; reported, not banded ({self.note}); "
                    f"stored spread in {self.source}")
        basis = f" for {self.basis}" if self.basis else ""
        stored = ("no stored entry" if self.stored is None
                  else f"stored {fmt_num(self.stored)} +/- {fmt_num(self.tolerance)}{basis}")
        if self.status == "nonfinite":
            return (f"{BEHAVIOUR_TAG} {self.key}: measured {self.measured!r}, not a finite number (NaN/inf in what "
                    f"it was computed from); {stored} in {self.source}: not compared")
        if self.status == "unmeasured":
            return f"{self.key}: could not be measured ({self.reason}); {stored} in {self.source}: not compared"
        metric = metrics.METRICS.get(self.key.rsplit("/", 1)[-1])
        what = ("ratio" if metric is None or metric.unit == "ratio" and not metric.reference
                else metric.unit if metric.reference else metric.name)  # "kl", "logit_error": not ratios
        cut = f" (band cut from {self.note})" if self.note else ""
        head = f"{self.key}: measured {what} {fmt_num(self.measured)}, {stored}{cut} in {self.source}"
        if self.status == "ok":
            return f"{head}: ok, {'the prediction holds' if self.predicted else 'within the band'}"
        says = (metric.above if self.measured > self.stored else metric.below) if metric else "differs"
        if self.predicted:
            return (f"{head}: PREDICTION MISSED: this device {says} than the CPU predicted - the CPU model of its "
                    f"memory is wrong here, a finding (the prediction's terms and limits are in the entry's "
                    f"produced_by); once understood, record the measured value on this device with {UPDATE_HINT}")
        if self.release_range:  # a per-release value is not the pin's: --update-baselines rewrites the pin's
            return f"{head}: {self.status}: {says} than the baseline (if intended, {RANGE_HINT})"
        if self.status == "regression":
            return f"{head}: regression: {says} than the baseline (if intended, update with {UPDATE_HINT})"
        return (f"{head}: improvement: {says} than the baseline - "
                f"update the baseline if intended with {UPDATE_HINT}")


# The card's claim "HQQ and quanto below the unquantized run at batch 200": a quantized run's
# peak is below none's by at least this share of the analytic cache saving (cache_none -
# cache_quantized, exact), so a run that saves only allocator rounding does not pass.
SAVING_SHOWN = 0.5


def saving_problem(label: str, metric: str, none_value: int, quantized_value: int, saving: int) -> str | None:
    """None when ``quantized_value`` is below ``none_value`` by SAVING_SHOWN of ``saving``, else why not."""
    realized = none_value - quantized_value
    if realized >= SAVING_SHOWN * saving:
        return None
    return (f"{label}: {metric} {quantized_value / 2**20:.0f} MiB against none's {none_value / 2**20:.0f} MiB saves "
            f"{realized / 2**20:.0f} MiB; the analytic cache saving is {saving / 2**20:.0f} MiB, of which at least "
            f"{SAVING_SHOWN:.0%} must show")


def problems(verdicts: list[Verdict]) -> list[str]:
    """Messages of every verdict that is not ok (a missing entry too: never green with nothing compared)."""
    return [v.message for v in verdicts if not v.passed]


def expected(entry: Entry, transformers_version: str | None) -> tuple[float, float, str, str]:
    """(ratio, tolerance, basis, range) an entry holds for a transformers release (range "": its own)."""
    rv = entry.value_for(transformers_version)
    if rv is not None:
        return rv.ratio, rv.tolerance, rv.describe(), f"{rv.package} {rv.releases}"
    others = [f"{k} {v}" for k in provenance.PACKAGES[1:] if (v := entry.pinned(k)) is not None]
    pinned = entry.pinned("transformers")
    basis = (f"transformers {pinned}" + (f" with {', '.join(others)}" if others else "") + " (the entry's own ratio)"
             if pinned else "")
    return entry.ratio, entry.tolerance, basis, ""


_INSTALLED = object()


def _stored(entry: Entry | None, transformers_version) -> tuple:
    if entry is None:
        return None, None, "", ""
    if transformers_version is _INSTALLED:
        transformers_version = provenance.installed("transformers")
    return expected(entry, transformers_version)


def compare(baseline: BaselineFile, backend: str, batch: int, metric: str,
            measured_ratio: float, transformers_version: str | None = _INSTALLED,
            allocator: str | None = None) -> Verdict:
    """``measured_ratio`` against the stored value for ``transformers_version`` (default: installed).
    A reserved reading (metrics.ALLOCATOR_DEPENDENT) taken under ``allocator`` is reported, not
    compared, against an entry taken under another allocator configuration."""
    if not is_number(measured_ratio):
        raise ValueError(f"measured ratio must be a number, got {measured_ratio!r}")
    key, source = entry_key(backend, batch, metric), str(baseline.path)
    entry = baseline.entries.get(key)
    ratio, tolerance, basis, release_range = _stored(entry, transformers_version)
    if not math.isfinite(measured_ratio):
        # A finding, not a crash: NaN compares false both ways (it would pass as an "improvement").
        return Verdict(key, measured_ratio, ratio, tolerance, "nonfinite", source, basis=basis,
                       release_range=release_range)
    if entry is None:
        return Verdict(key, measured_ratio, None, None, "missing", source)
    if metric in metrics.ALLOCATOR_DEPENDENT and entry.allocator != allocator:
        return Verdict(key, measured_ratio, ratio, tolerance, "reported", source, basis=basis,
                       note=f"this run's allocator is {allocator or 'not recorded'}, the entry's "
                            f"{entry.allocator or 'not recorded'}: not compared (measure/reserved.py)")
    if entry.spread is not None and not entry.spread.banded and not release_range:
        return Verdict(key, measured_ratio, ratio, tolerance, "reported", source, basis=basis, note=entry.spread.note)
    lo, hi = ratio - tolerance - EDGE_SLACK, ratio + tolerance + EDGE_SLACK
    worse = (measured_ratio < lo) if metric in metrics.HIGHER_IS_BETTER else (measured_ratio > hi)
    status = "ok" if lo <= measured_ratio <= hi else "regression" if worse else "improvement"
    if is_predicted(entry):
        basis = "a prediction from CPU proxies (runner/gpu_prediction.py)"
    cut, sp = "", entry.spread
    if sp is not None and not release_range:
        cut = (f"the spread {'..'.join(map(fmt_num, sp.bounds))} on {len(sp.observed)} machine/path runs, "
               f"margin {sp.margin:g}")
    return Verdict(key, measured_ratio, ratio, tolerance, status, source, basis=basis, release_range=release_range,
                   note=cut, predicted=is_predicted(entry))


def unmeasured(baseline: BaselineFile, backend: str, batch: int, metric: str, reason: str,
               transformers_version: str | None = _INSTALLED) -> Verdict:
    """A failing verdict for an entry the run could not produce (OOM, timeout): never a silent pass."""
    key = entry_key(backend, batch, metric)
    ratio, tolerance, basis, release_range = _stored(baseline.entries.get(key), transformers_version)
    return Verdict(key, math.nan, ratio, tolerance, "unmeasured", str(baseline.path), reason, basis, release_range)


def drift_lines(path, verdicts: list[Verdict], versions: dict[str, str]) -> list[str]:
    """Measured vs stored where an entry's package versions are not ``versions`` (even inside the band)."""
    stored = load(path)
    lines = []
    for v in verdicts:
        entry = stored.entries.get(v.key)
        if entry is None:
            continue
        # The value compared with: a per-release one is recorded for its package's release.
        rv = entry.value_for(versions.get("transformers"), versions)
        ratio = entry.ratio if rv is None else rv.ratio
        theirs = dict((entry.produced_by if rv is None else rv.produced_by).get("versions", {}))
        if rv is not None:
            theirs.pop(rv.package, None)
        changed = {k: f"{theirs[k]} -> {versions[k]}" for k in versions if k in theirs and theirs[k] != versions[k]}
        if changed:
            lines.append(f"{v.key}: stored {ratio:.4g}, measured {v.measured:.4g} "
                         f"({v.measured / ratio - 1:+.1%}) [{', '.join(f'{k} {c}' for k, c in changed.items())}]")
    return lines
