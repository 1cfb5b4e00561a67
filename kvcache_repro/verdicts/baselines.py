"""Stored memory baselines for the experiment: one JSON file per scenario.

Each entry is the ratio of a memory metric for a quantized backend to the unquantized
(`none`) run at the same batch size. Ratios rather than bytes, so a baseline survives a
change of machine that scales both runs alike. Lower is better.

An entry's ``ratio`` is the pinned transformers release's (the one in its
``produced_by``). Memory bytes include the model's and the cache layer's own temporaries,
which legitimately differ between releases, so an entry may also hold ``by_release``:
values for ranges of other transformers releases, found by measurement, each saying
which releases it was observed on. ``compare`` uses the range holding the installed
transformers, and the entry's own ratio outside every range (a newer release that
changes nothing compares against the pin's value).

Stdlib only (plus ``packaging``, as compat.py): the store is read by tooling that must
not pay for importing torch.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

from kvcache_repro.core import metrics
from kvcache_repro.core.atomic import write_atomic
from kvcache_repro.verdicts.tags import BEHAVIOUR_TAG

# The metrics' table (names, what a move reads as, which is better): core/metrics.py.
MEMORY_METRICS, ACCURACY_METRICS, SPEED_METRICS = (metrics.of_kind(k) for k in (metrics.MEMORY, metrics.ACCURACY,
                                                                                   metrics.SPEED))
METRICS: tuple[str, ...] = tuple(metrics.METRICS)
HIGHER_IS_BETTER = metrics.HIGHER_IS_BETTER

# Where every baseline file lives: baselines/ at the repository's top level.
BASELINE_DIR = Path(__file__).resolve().parents[2] / "baselines"

UPDATE_COMMAND = "./kvq experiment --update-baselines"
UPDATE_HINT = f"`{UPDATE_COMMAND}` (or `pytest -m ... --kv-update-baselines`)"
# Records only the entries with no stored value, leaving every stored one as it is.
RECORD_COMMAND = "./kvq experiment --record-missing-baselines"
RECORD_HINT = f"`{RECORD_COMMAND}` (or {UPDATE_HINT}, which also rewrites stored entries)"

# Ratios are computed from byte counts, so a value printed as exactly the band edge may
# sit one ulp outside it; the band is meant to be inclusive as a human reads it.
_EDGE_SLACK = 1e-9


def _num(x: float) -> str:
    """Three decimals, or three significant digits for small values (KL of 8-bit caches)."""
    return f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.3g}"


class BaselineError(ValueError):
    def __init__(self, path, problem: str, fix: str | None = None):
        if fix is None:
            fix = (f"restore it from git (`git checkout -- {path}`) "
                   f"or regenerate it with `{UPDATE_COMMAND}`")
        super().__init__(f"{path}: {problem}; {fix}")
        self.path = path


# A per-release range as written in a baseline file: ">=LOW,<HIGH" (PEP 440 versions).
_RANGE = re.compile(r"^>=([^,<>=\s]+),<([^,<>=\s]+)$")
# How to re-record a per-release value (kvcache_repro/verdicts/release_baselines.py).
RANGE_COMMAND = "python -m kvcache_repro.verdicts.release_baselines SCENARIO RELEASE=RESULTS_DIR ... --write"
RANGE_HINT = (f"re-measure the releases of that range (`python -m kvcache_repro.runner.experiment --in-process` with each "
              f"release's interpreter) and record them with `{RANGE_COMMAND}`")
RANGE_FIX = ("write it as \">=LOW,<HIGH\" with LOW < HIGH (transformers versions, the first release "
             "showing the value and the first one not showing it), with the releases it was measured on "
             "in 'observed_on', or delete the range to compare against the entry's own ratio")


def parse_range(text) -> tuple[Version, Version]:
    """``">=5.0.0,<5.19.0"`` -> (low, high); ValueError saying what is wrong otherwise."""
    m = _RANGE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"range {text!r} is not of the form \">=LOW,<HIGH\"")
    try:
        low, high = Version(m.group(1)), Version(m.group(2))
    except InvalidVersion as exc:
        raise ValueError(f"range {text!r}: {exc}") from None
    if not low < high:
        raise ValueError(f"range {text!r} is empty (LOW must be below HIGH)")
    return low, high


def in_range(releases: str, version: str) -> bool:
    low, high = parse_range(releases)
    return low <= Version(version) < high


# The packages a range can belong to (package_specs.PACKAGES, repeated here: stdlib only).
RANGE_PACKAGES = ("transformers", "torch", "optimum-quanto", "hqq")


@dataclass(frozen=True)
class ReleaseValue:
    """An entry's value for a range of releases of one package (``package``, default
    transformers) other than the pinned one, the other packages pinned."""

    releases: str  # ">=LOW,<HIGH"
    ratio: float
    tolerance: float
    observed_on: tuple[str, ...]  # the releases this ratio was measured on (all in the range)
    produced_by: dict
    package: str = "transformers"

    def describe(self) -> str:
        return f"{self.package} {self.releases} (observed on {', '.join(self.observed_on)})"

    def to_json(self) -> dict:
        out = {"releases": self.releases, "ratio": self.ratio, "tolerance": self.tolerance,
               "observed_on": list(self.observed_on), "produced_by": self.produced_by}
        if self.package != "transformers":  # files of transformers ranges keep their format
            out["package"] = self.package
        return out


def installed_versions() -> dict[str, str]:
    """The installed release of each package a range can belong to (package metadata)."""
    out = {}
    for name in RANGE_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class Spread:
    """What an entry's band is cut from: the value measured on each machine and CPU code
    path (``observed``: label -> value, kvcache_repro/runner/spread.py), and the rule that turns
    it into the band (``bands.band``): centre the middle of the observed range, half-width
    ``margin`` x half the range and never below ``floor``. ``banded`` False: the spread
    is so wide that a band would catch nothing; the value is reported, not compared
    (``note`` says why). ``note`` of a banded entry: what regression its band catches."""

    observed: dict[str, float]
    margin: float
    floor: float
    banded: bool = True
    note: str = ""

    @property
    def low(self) -> float:
        return min(self.observed.values())

    @property
    def high(self) -> float:
        return max(self.observed.values())

    def to_json(self) -> dict:
        return {"observed": dict(sorted(self.observed.items())), "margin": self.margin, "floor": self.floor,
                "banded": self.banded, "note": self.note}


@dataclass(frozen=True)
class Entry:
    backend: str
    batch: int
    metric: str
    ratio: float
    tolerance: float
    produced_by: dict
    by_release: tuple[ReleaseValue, ...] = ()  # sorted by range
    spread: Spread | None = None  # entries without one: bands from a rule (exact bytes, speed.band)

    @property
    def key(self) -> str:
        return entry_key(self.backend, self.batch, self.metric)

    @property
    def pinned_release(self) -> str | None:
        """The transformers release the entry's own ratio was recorded on."""
        return self.pinned("transformers")

    def pinned(self, package: str) -> str | None:
        """The release of ``package`` the entry's own ratio was recorded on."""
        versions = self.produced_by.get("versions")
        return versions.get(package) if isinstance(versions, dict) else None

    def value_for(self, transformers_version: str | None, versions: dict[str, str] | None = None
                  ) -> ReleaseValue | None:
        """The per-release value whose range holds the running release of its package
        (transformers: ``transformers_version``; others: ``versions``, default the
        installed ones); None: the entry's own ratio applies. Ranges of two packages that
        both hold (two packages swapped at once): the first in RANGE_PACKAGES order."""
        for rv in sorted(self.by_release, key=lambda rv: RANGE_PACKAGES.index(rv.package)):
            if rv.package == "transformers":
                running = transformers_version
            else:
                versions = installed_versions() if versions is None else versions
                running = versions.get(rv.package)
            try:
                if running and in_range(rv.releases, running):
                    return rv
            except InvalidVersion:
                continue
        return None

    def to_json(self) -> dict:
        out = {
            "backend": self.backend, "batch": self.batch, "metric": self.metric,
            "ratio": self.ratio, "tolerance": self.tolerance,
            "produced_by": self.produced_by,
        }
        if self.by_release:  # files without ranges keep their format
            out["by_release"] = [rv.to_json() for rv in self.by_release]
        if self.spread is not None:
            out["spread"] = self.spread.to_json()
        return out


@dataclass
class BaselineFile:
    path: Path
    scenario: str
    description: str
    entries: dict[str, Entry]
    # What every number in the file depends on (a user's model: model, dtype, weights,
    # device, settings); None for the built-in scenarios, whose name fixes all of it.
    key: dict | None = None

    def to_json(self) -> dict:
        out = {
            "scenario": self.scenario,
            "description": self.description,
            "entries": {k: e.to_json() for k, e in self.entries.items()},
        }
        if self.key is not None:  # files without a key keep their format
            out["key"] = self.key
        return out


def entry_key(backend: str, batch: int, metric: str) -> str:
    return f"{backend}/b{batch}/{metric}"


def _is_number(x) -> bool:
    # bool is an int subclass; `true` in a baseline file is a typo, not a ratio.
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _entry_from_json(path, key, raw) -> Entry:
    where = f"entry {key!r}"
    if not isinstance(raw, dict):
        raise BaselineError(path, f"{where} must be an object, got {type(raw).__name__}")
    fields = ("backend", "batch", "metric", "ratio", "tolerance", "produced_by")
    missing = [f for f in fields if f not in raw]
    if missing:
        raise BaselineError(path, f"{where} is missing field(s) {', '.join(missing)}")
    backend, batch, metric = raw["backend"], raw["batch"], raw["metric"]
    ratio, tol, produced_by = raw["ratio"], raw["tolerance"], raw["produced_by"]
    if not isinstance(backend, str) or not backend:
        raise BaselineError(path, f"{where}: field 'backend' must be a non-empty string")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise BaselineError(path, f"{where}: field 'batch' must be a positive integer, got {batch!r}")
    if metric not in METRICS:
        raise BaselineError(path, f"{where}: unknown metric {metric!r} (valid: {', '.join(METRICS)})")
    if not _is_number(ratio) or not math.isfinite(ratio) or ratio <= 0:
        raise BaselineError(path, f"{where}: field 'ratio' must be a finite number > 0, got {ratio!r}")
    if not _is_number(tol) or not math.isfinite(tol) or tol < 0:
        raise BaselineError(path, f"{where}: field 'tolerance' must be a finite number >= 0, got {tol!r}")
    if not isinstance(produced_by, dict):
        raise BaselineError(path, f"{where}: field 'produced_by' must be an object")
    entry = Entry(backend, batch, metric, float(ratio), float(tol), produced_by,
                  _release_values_from_json(path, where, raw.get("by_release", []), produced_by),
                  _spread_from_json(path, where, raw.get("spread"), float(ratio), float(tol)))
    if entry.key != key:
        raise BaselineError(path, f"{where} does not match its fields, which give key {entry.key!r}")
    return entry


SPREAD_FIX = ("re-measure the spread (`python -m kvcache_repro.runner.spread run DIR`) and rewrite the band from it "
              "(`python -m kvcache_repro.verdicts.bands apply`), or restore the file from git")


def _spread_from_json(path, where, raw, ratio: float, tol: float) -> Spread | None:
    """An entry's ``spread``, checked: finite observed values, margin >= 1, and a band that
    holds every observed value (a band narrower than the spread it says it comes from
    would fail on a machine the file itself lists)."""
    if raw is None:
        return None
    at = f"{where}, spread"
    if not isinstance(raw, dict):
        raise BaselineError(path, f"{at} must be an object, got {type(raw).__name__}", SPREAD_FIX)
    observed, margin, floor = raw.get("observed"), raw.get("margin"), raw.get("floor")
    banded, note = raw.get("banded", True), raw.get("note", "")
    if (not isinstance(observed, dict) or not observed
            or not all(isinstance(k, str) and _is_number(v) and math.isfinite(v) for k, v in observed.items())):
        raise BaselineError(path, f"{at}: 'observed' must be a non-empty object of label -> finite number",
                            SPREAD_FIX)
    if not _is_number(margin) or not math.isfinite(margin) or margin < 1:
        raise BaselineError(path, f"{at}: 'margin' must be a number >= 1, got {margin!r}", SPREAD_FIX)
    if not _is_number(floor) or not math.isfinite(floor) or floor < 0:
        raise BaselineError(path, f"{at}: 'floor' must be a finite number >= 0, got {floor!r}", SPREAD_FIX)
    if not isinstance(banded, bool) or not isinstance(note, str):
        raise BaselineError(path, f"{at}: 'banded' must be true/false and 'note' a string", SPREAD_FIX)
    spread = Spread({k: float(v) for k, v in observed.items()}, float(margin), float(floor), banded, note)
    if banded and not (ratio - tol - _EDGE_SLACK <= spread.low and spread.high <= ratio + tol + _EDGE_SLACK):
        raise BaselineError(path, f"{at}: the band {_num(ratio)} +/- {_num(tol)} does not hold the spread it was "
                                  f"cut from ({_num(spread.low)}..{_num(spread.high)})", SPREAD_FIX)
    return spread


def _release_values_from_json(path, where, raw, produced_by) -> tuple[ReleaseValue, ...]:
    """Validate an entry's ``by_release`` list: well-formed ranges, each with the releases
    it was observed on inside it, no two overlapping, none holding the pinned release."""
    if not isinstance(raw, list):
        raise BaselineError(path, f"{where}: field 'by_release' must be a list, got {type(raw).__name__}",
                            RANGE_FIX)
    out = []
    for i, item in enumerate(raw):
        at = f"{where}, by_release[{i}]"
        if not isinstance(item, dict):
            raise BaselineError(path, f"{at} must be an object, got {type(item).__name__}", RANGE_FIX)
        fields = ("releases", "ratio", "tolerance", "observed_on", "produced_by")
        missing = [f for f in fields if f not in item]
        if missing:
            raise BaselineError(path, f"{at} is missing field(s) {', '.join(missing)}", RANGE_FIX)
        releases, ratio, tol, seen, prov = (item[f] for f in fields)
        package = item.get("package", "transformers")
        if package not in RANGE_PACKAGES:
            raise BaselineError(path, f"{at}: unknown package {package!r} (valid: {', '.join(RANGE_PACKAGES)})",
                                RANGE_FIX)
        try:
            parse_range(releases)
        except ValueError as exc:
            raise BaselineError(path, f"{at}: {exc}", RANGE_FIX) from None
        if not _is_number(ratio) or not math.isfinite(ratio) or ratio <= 0:
            raise BaselineError(path, f"{at}: field 'ratio' must be a finite number > 0, got {ratio!r}", RANGE_FIX)
        if not _is_number(tol) or not math.isfinite(tol) or tol < 0:
            raise BaselineError(path, f"{at}: field 'tolerance' must be a finite number >= 0, got {tol!r}",
                                RANGE_FIX)
        if not isinstance(seen, list) or not seen or not all(isinstance(v, str) for v in seen):
            raise BaselineError(path, f"{at}: field 'observed_on' must be a non-empty list of releases, got {seen!r}",
                                RANGE_FIX)
        for v in seen:
            try:
                inside = in_range(releases, v)
            except InvalidVersion:
                raise BaselineError(path, f"{at}: observed_on holds {v!r}, not a version", RANGE_FIX) from None
            if not inside:
                raise BaselineError(path, f"{at}: observed on {v}, which lies outside its range {releases}",
                                    RANGE_FIX)
        if not isinstance(prov, dict):
            raise BaselineError(path, f"{at}: field 'produced_by' must be an object", RANGE_FIX)
        out.append(ReleaseValue(releases, float(ratio), float(tol), tuple(seen), prov, package))
    return _check_ranges(path, where, out, produced_by)


def _check_ranges(path, where, values, produced_by) -> tuple[ReleaseValue, ...]:
    """Per package: no two ranges overlap, none holds the release the entry's own ratio
    was recorded on."""
    values = sorted(values, key=lambda rv: (RANGE_PACKAGES.index(rv.package), parse_range(rv.releases)))
    for a, b in zip(values, values[1:]):
        if a.package == b.package and parse_range(b.releases)[0] < parse_range(a.releases)[1]:
            raise BaselineError(path, f"{where}: {a.package} ranges {a.releases} and {b.releases} overlap", RANGE_FIX)
    versions = produced_by.get("versions") if isinstance(produced_by, dict) else None
    for rv in values:
        pinned = versions.get(rv.package) if isinstance(versions, dict) else None
        if not pinned:
            continue
        try:
            holds = in_range(rv.releases, pinned)
        except InvalidVersion:
            continue  # a non-PEP 440 pin ("?"): no range can hold it
        if holds:
            raise BaselineError(
                path, f"{where}: range {rv.releases} holds {rv.package} {pinned}, the release the entry's "
                      f"own ratio was recorded on (that release would never be compared with it)",
                "the entry's 'ratio' belongs to the pinned release: update baselines only on the release "
                f"you pin, record other releases' values with `{RANGE_COMMAND}`, or narrow/delete that range")
    return tuple(values)


def load(path) -> BaselineFile:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        # A scenario nobody has recorded yet: every comparison reports "missing".
        return BaselineFile(path, path.stem, "", {})
    except UnicodeDecodeError as exc:
        raise BaselineError(path, f"not UTF-8 text ({exc})") from None
    return parse(path, text)


def parse(path, text: str) -> BaselineFile:
    """The baseline file ``text`` (read from ``path``), validated as ``load`` does."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BaselineError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BaselineError(path, f"top level must be an object, got {type(data).__name__}")
    for field, kind in (("scenario", str), ("entries", dict)):
        if field not in data:
            raise BaselineError(path, f"missing top-level field {field!r}")
        if not isinstance(data[field], kind):
            raise BaselineError(path, f"top-level field {field!r} must be a {kind.__name__}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise BaselineError(path, "top-level field 'description' must be a string")
    key = data.get("key")
    if key is not None and not isinstance(key, dict):
        raise BaselineError(path, "top-level field 'key' must be an object (what the file's numbers depend on)")
    entries = {k: _entry_from_json(path, k, v) for k, v in data["entries"].items()}
    return BaselineFile(path, data["scenario"], description, entries, key)


@dataclass(frozen=True)
class Verdict:
    key: str  # backend/b<batch>/<metric>
    measured: float
    stored: float | None
    tolerance: float | None
    status: str  # "ok" | "reported" (not banded) | "regression" | "improvement" | "missing" | "unmeasured" | "nonfinite"
    source: str = ""  # the baseline file, so a failure says where to look
    reason: str = ""  # "unmeasured": why the run has no value for it (OOM, timeout, ...)
    basis: str = ""  # which release(s) the stored value belongs to, e.g. "transformers >=5.0.0,<5.19.0 (observed on ...)"
    release_range: str = ""  # the per-release range compared with ("" : the entry's own ratio)

    note: str = ""  # "reported": why the entry is not banded; banded: the spread the band was cut from
    predicted: bool = False  # the stored value is a prediction (runner/gpu_prediction.py), not a measurement

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "reported")

    @property
    def message(self) -> str:
        if self.status == "missing":
            where = (f"in {self.source}" if Path(self.source).exists()
                     else f"because the baseline file {self.source} does not exist")
            return (f"{self.key}: measured ratio {_num(self.measured)}; no stored entry for "
                    f"this key {where} - record it with {RECORD_HINT}")
        basis = f" for {self.basis}" if self.basis else ""
        if self.status == "nonfinite":
            stored = ("no stored entry" if self.stored is None
                      else f"stored {_num(self.stored)} +/- {_num(self.tolerance)}{basis}")
            return (f"{BEHAVIOUR_TAG} {self.key}: measured {self.measured!r}, not a finite number (NaN/inf in what "
                    f"it was computed from); {stored} in {self.source}: not compared")
        if self.status == "unmeasured":
            stored = ("no stored entry" if self.stored is None
                      else f"stored {_num(self.stored)} +/- {_num(self.tolerance)}{basis}")
            return f"{self.key}: could not be measured ({self.reason}); {stored} in {self.source}: not compared"
        cut = f" (band cut from {self.note})" if self.note else ""
        what = metrics.METRICS[m].unit if (m := self.key.rsplit("/", 1)[-1]) in metrics.REFERENCE_METRICS else "ratio"
        head = (f"{self.key}: measured {what} {_num(self.measured)}, stored {_num(self.stored)} "
                f"+/- {_num(self.tolerance)}{basis}{cut} in {self.source}")
        if self.status == "ok":
            return f"{head}: ok, {'the prediction holds' if self.predicted else 'within the band'}"
        if self.status == "reported":
            return (f"{self.key}: measured {_num(self.measured)}; reported, not banded ({self.note}); "
                    f"stored spread in {self.source}")
        metric = self.key.rsplit("/", 1)[-1]
        above = self.measured > self.stored
        says = ((metrics.METRICS[metric].above if above else metrics.METRICS[metric].below)
                if metric in metrics.METRICS else "differs")
        if self.predicted:
            return (f"{head}: PREDICTION MISSED: this device {says} than the CPU predicted - the CPU model of its "
                    f"memory is wrong here, a finding (the prediction's terms and limits are in the entry's "
                    f"produced_by); once understood, record the measured value on this device with {UPDATE_HINT}")
        # A per-release value is not the pin's: --update-baselines would rewrite the pin's.
        if self.release_range:
            return f"{head}: {self.status}: {says} than the baseline (if intended, {RANGE_HINT})"
        if self.status == "regression":
            return (f"{head}: regression: {says} than the baseline "
                    f"(if intended, update with {UPDATE_HINT})")
        return (f"{head}: improvement: {says} than the baseline - "
                f"update the baseline if intended with {UPDATE_HINT}")


def problems(verdicts: list[Verdict]) -> list[str]:
    """Messages of every verdict that is not ok: out of band, or with no stored entry
    (a renamed protocol or a deleted file must not leave a run green with nothing
    compared; the message names the command that records it)."""
    return [v.message for v in verdicts if not v.passed]


def installed_transformers() -> str | None:
    """The installed transformers release (package metadata: no import), None without one."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def expected(entry: Entry, transformers_version: str | None) -> tuple[float, float, str, str]:
    """(ratio, tolerance, basis, range) an entry holds for a transformers release: its
    per-release value whose range holds the release, else its own ratio (the pinned
    release's; range "")."""
    rv = entry.value_for(transformers_version)
    if rv is not None:
        return rv.ratio, rv.tolerance, rv.describe(), f"{rv.package} {rv.releases}"
    pinned = entry.pinned_release
    versions = entry.produced_by.get("versions") if isinstance(entry.produced_by, dict) else None
    others = [f"{k} {versions[k]}" for k in RANGE_PACKAGES[1:] if isinstance(versions, dict) and k in versions]
    basis = (f"transformers {pinned}" + (f" with {', '.join(others)}" if others else "") + " (the entry's own ratio)"
             if pinned else "")
    return entry.ratio, entry.tolerance, basis, ""


_INSTALLED = object()


def compare(baseline: BaselineFile, backend: str, batch: int, metric: str,
            measured_ratio: float, transformers_version: str | None = _INSTALLED) -> Verdict:
    """``measured_ratio`` against the stored value for ``transformers_version`` (default:
    the installed release; see ``expected``)."""
    if not _is_number(measured_ratio):
        raise ValueError(f"measured ratio must be a number, got {measured_ratio!r}")
    key = entry_key(backend, batch, metric)
    source = str(baseline.path)
    entry = baseline.entries.get(key)
    if transformers_version is _INSTALLED:
        transformers_version = installed_transformers()
    if not math.isfinite(measured_ratio):
        # A finding, not a crash: NaN compares false both ways (it would slip through as an
        # "improvement"), so it fails on its own and the other entries are still compared.
        stored = expected(entry, transformers_version) if entry is not None else (None, None, "", "")
        return Verdict(key, measured_ratio, stored[0], stored[1], "nonfinite", source, basis=stored[2],
                       release_range=stored[3])
    if entry is None:
        return Verdict(key, measured_ratio, None, None, "missing", source)
    ratio, tolerance, basis, release_range = expected(entry, transformers_version)
    if entry.spread is not None and not entry.spread.banded and not release_range:
        return Verdict(key, measured_ratio, ratio, tolerance, "reported", source, basis=basis, note=entry.spread.note)
    lo = ratio - tolerance - _EDGE_SLACK
    hi = ratio + tolerance + _EDGE_SLACK
    if lo <= measured_ratio <= hi:
        status = "ok"
    else:
        worse = (measured_ratio < lo) if metric in HIGHER_IS_BETTER else (measured_ratio > hi)
        status = "regression" if worse else "improvement"
    if is_predicted(entry):
        basis = "a prediction from CPU proxies (runner/gpu_prediction.py)"
    cut = ""
    if entry.spread is not None and not release_range:
        sp = entry.spread
        cut = f"the spread {_num(sp.low)}..{_num(sp.high)} on {len(sp.observed)} machine/path runs, margin {sp.margin:g}"
    return Verdict(key, measured_ratio, ratio, tolerance, status, source, basis=basis, release_range=release_range,
                   note=cut, predicted=is_predicted(entry))


PREDICTED_KIND = "predicted"


def is_predicted(entry: Entry) -> bool:
    """The entry's value is a prediction (produced_by.kind), replaced by a measurement
    only through an update on the device it predicts."""
    return isinstance(entry.produced_by, dict) and entry.produced_by.get("kind") == PREDICTED_KIND


def unmeasured(baseline: BaselineFile, backend: str, batch: int, metric: str, reason: str,
               transformers_version: str | None = _INSTALLED) -> Verdict:
    """A baseline entry the run could not produce (its row ran out of memory, timed out,
    or failed): a failing verdict that says so, never a silent pass."""
    key = entry_key(backend, batch, metric)
    entry = baseline.entries.get(key)
    if entry is None:
        return Verdict(key, math.nan, None, None, "unmeasured", str(baseline.path), reason)
    if transformers_version is _INSTALLED:
        transformers_version = installed_transformers()
    ratio, tolerance, basis, release_range = expected(entry, transformers_version)
    return Verdict(key, math.nan, ratio, tolerance, "unmeasured", str(baseline.path), reason, basis, release_range)


def dumps(baseline: BaselineFile) -> str:
    return json.dumps(baseline.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"


def update(path, entries: list[Entry], *, run_failed: bool, scenario: str,
           description: str = "", reset_tolerance: bool = False, key: dict | None = None) -> list[str]:
    """Write ``entries`` into the file at ``path``, atomically. An entry already stored
    keeps its tolerance (a band is a decision, derived from measured spread; a re-run
    must not widen or narrow it silently) unless ``reset_tolerance``, and its per-release
    values (``by_release``: measured on other releases, never dropped by a run on the pin;
    a given entry's own ``by_release`` replaces stored ranges of the same package and ``releases``)."""
    path = Path(path)
    file_key = key  # the name `key` is taken by the entry loop below
    rerun = f"fix the run and rerun `{UPDATE_COMMAND}`; the file was left untouched"
    if run_failed:
        # Numbers from a failed run would silently become the new normal.
        raise BaselineError(path, "refusing to update baselines from a failed run", rerun)
    if not entries:
        raise BaselineError(path, "refusing to update baselines with no entries", rerun)
    fresh: dict[str, Entry] = {}
    for e in entries:
        if e.key in fresh:
            raise BaselineError(path, f"entry {e.key!r} given twice", rerun)
        # Same checks as on load, so update never writes a file that load would reject.
        fresh[e.key] = _entry_from_json(path, e.key, e.to_json())
        for rv in e.by_release:
            if abs(rv.ratio - e.ratio) <= e.tolerance + _EDGE_SLACK:
                # Such a range compares as the entry's own ratio does: it would only hide
                # that the release behaves like the pin.
                raise BaselineError(path, f"entry {e.key!r}: the value {_num(rv.ratio)} for {rv.releases} lies in "
                                          f"the entry's own band ({_num(e.ratio)} +/- {_num(e.tolerance)})",
                                    "store a per-release value only where it differs from the entry's ratio "
                                    "by more than its tolerance")

    current = load(path)  # raises on a corrupt file, which is then never overwritten
    if path.exists() and current.scenario != scenario:
        raise BaselineError(
            path, f"file holds scenario {current.scenario!r}, not {scenario!r}",
            "pass the baseline file that belongs to this scenario")
    if path.exists() and file_key is not None and current.key not in (None, file_key):
        raise BaselineError(path, f"file holds the baselines of another setup ({current.key}), not of {file_key}",
                            "leave it: a setup of its own gets a file of its own (its name is a digest of the key)")
    lines = []
    for key, e in fresh.items():
        old = current.entries.get(key)
        if old is not None:
            # A measurement replaces a prediction whole, band included: the predicted band
            # stands for the prediction's limits, not for the spread of measurements.
            replaces_prediction = is_predicted(old) and not is_predicted(e)
            tolerance = e.tolerance if reset_tolerance or replaces_prediction else old.tolerance
            given = {(rv.package, rv.releases) for rv in e.by_release}
            kept = [rv for rv in old.by_release if (rv.package, rv.releases) not in given]
            # Validated again: the new pinned release must not lie in a kept range.
            ratio, spread = e.ratio, e.spread
            if old.spread is not None and spread is None:
                # A reset re-cuts the band from the spread; it never drops the spread for one machine's floor.
                ratio, tolerance, spread = merge_spread(old, e, keep_width=not reset_tolerance)
            e = Entry(e.backend, e.batch, e.metric, ratio, tolerance, e.produced_by,
                      _check_ranges(path, f"entry {key!r}", kept + list(e.by_release), e.produced_by), spread)
        line = f"{key}: {'new' if old is None else _num(old.ratio)} -> {_num(e.ratio)}"
        if old is not None and is_predicted(old) and not is_predicted(e):
            line += " (a measurement replaces the prediction)"
        if old is not None and old.tolerance != e.tolerance:
            line += f" (tolerance {_num(old.tolerance)} -> {_num(e.tolerance)})"
        if e.by_release:
            line += f" (per-release values kept for {', '.join(rv.releases for rv in e.by_release)})"
        lines.append(line)
        current.entries[key] = e
    current.scenario = scenario
    if file_key is not None:
        current.key = file_key
    if description:
        current.description = description
    write_atomic(path, dumps(current))
    return lines


def round_up(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits: a stored band never comes out
    narrower than the spread it was cut from."""
    if x <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / scale - 1e-9) * scale


def band(observed: dict[str, float], margin: float, floor: float) -> tuple[float, float]:
    """(centre, half-width) of the band cut from ``observed``: the middle of the observed
    range, ``margin`` x its half-range and never below ``floor``; it holds every value."""
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
    return f"{m.get('cpu', '?')} {m.get('torch_capability', '?')} {m.get('threads', '?')}t" + (f" [{env}]" if env else "")


def merge_spread(old: Entry, new: Entry, keep_width: bool = True) -> tuple[float, float, Spread]:
    """An update on one machine adds its value to the stored spread; the band is cut
    again from all of it and never comes out narrower than the stored one. A run on
    other package versions starts the observations anew (the old ones describe other
    code) but keeps the stored width: the spread between machines is re-measured with
    `python -m kvcache_repro.runner.spread`, not guessed from one machine. ``keep_width`` False
    (--reset-tolerances): the band is what the observations give, the stored width aside."""
    same_versions = old.produced_by.get("versions") == new.produced_by.get("versions")
    observed = dict(old.spread.observed) if same_versions else {}
    observed[machine_label(new.produced_by)] = new.ratio
    centre, tol = band(observed, old.spread.margin, old.spread.floor)
    spread = Spread(observed, old.spread.margin, old.spread.floor, old.spread.banded, old.spread.note)
    return centre, max(tol, old.tolerance) if keep_width else tol, spread


def drift_lines(path, verdicts: list[Verdict], versions: dict[str, str]) -> list[str]:
    """For entries recorded with other package versions than the running ones: measured
    vs stored per entry, so a version change shows what moved even inside the bands."""
    stored = load(path)
    lines = []
    for v in verdicts:
        entry = stored.entries.get(v.key)
        if entry is None:
            continue
        # The value compared with: a per-release one is recorded for this transformers
        # release (its other versions still count).
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
