"""Stored baselines for the experiment: one JSON file per scenario, read and validated.

Each entry is the ratio of a memory metric for a quantized backend to the unquantized
(`none`) run at the same batch size. Ratios rather than bytes, so a baseline survives a
change of machine that scales both runs alike. Lower is better.

An entry's ``ratio`` is the pinned transformers release's (the one in its
``produced_by``). Memory bytes include the model's and the cache layer's own temporaries,
which legitimately differ between releases, so an entry may also hold ``by_release``:
values for ranges of other transformers releases, found by measurement, each saying
which releases it was observed on (verdicts/release_ranges.py). A comparison
(verdicts/comparison.py) uses the range holding the installed transformers, and the
entry's own ratio outside every range (a newer release that changes nothing compares
against the pin's value). A run is written into a file by verdicts/baseline_update.py.

Stdlib only (plus ``packaging``, as compat.py): the store is read by tooling that must
not pay for importing torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion

from kvcache_repro.core import metrics, provenance
from kvcache_repro.verdicts.release_ranges import RANGE_COMMAND, RANGE_FIX, ReleaseValue, in_range, parse_range

# Where every baseline file lives: baselines/ at the repository's top level.
BASELINE_DIR = Path(__file__).resolve().parents[2] / "baselines"

UPDATE_COMMAND = "./kvq experiment --update-baselines"
UPDATE_HINT = f"`{UPDATE_COMMAND}` (or `pytest -m ... --kv-update-baselines`)"

# Records only the entries with no stored value, leaving every stored one as it is.
RECORD_COMMAND = "./kvq experiment --record-missing-baselines"
RECORD_HINT = f"`{RECORD_COMMAND}` (or {UPDATE_HINT}, which also rewrites stored entries)"

# Ratios are computed from byte counts, so a value printed as exactly the band edge may
# sit one ulp outside it; the band is meant to be inclusive as a human reads it.
EDGE_SLACK = 1e-9


def fmt_num(x: float) -> str:
    """Three decimals, or three significant digits for small values (KL of 8-bit caches)."""
    return f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.3g}"


class BaselineError(ValueError):
    def __init__(self, path, problem: str, fix: str | None = None):
        if fix is None:
            fix = (f"restore it from git (`git checkout -- {path}`) "
                   f"or regenerate it with `{UPDATE_COMMAND}`")
        super().__init__(f"{path}: {problem}; {fix}")
        self.path = path


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
        both hold (two packages swapped at once): the first in provenance.PACKAGES order."""
        for rv in sorted(self.by_release, key=lambda rv: provenance.PACKAGES.index(rv.package)):
            if rv.package == "transformers":
                running = transformers_version
            else:
                versions = provenance.package_versions() if versions is None else versions
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


def is_number(x) -> bool:
    # bool is an int subclass; `true` in a baseline file is a typo, not a ratio.
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def entry_from_json(path, key, raw) -> Entry:
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
    if metric not in metrics.METRICS:
        raise BaselineError(path, f"{where}: unknown metric {metric!r} (valid: {', '.join(metrics.METRICS)})")
    if not is_number(ratio) or not math.isfinite(ratio) or ratio <= 0:
        raise BaselineError(path, f"{where}: field 'ratio' must be a finite number > 0, got {ratio!r}")
    if not is_number(tol) or not math.isfinite(tol) or tol < 0:
        raise BaselineError(path, f"{where}: field 'tolerance' must be a finite number >= 0, got {tol!r}")
    if not isinstance(produced_by, dict):
        raise BaselineError(path, f"{where}: field 'produced_by' must be an object")
    entry = Entry(backend, batch, metric, float(ratio), float(tol), produced_by,
                  _release_values_from_json(path, where, raw.get("by_release", []), produced_by),
                  _spread_from_json(path, where, raw.get("spread"), float(ratio), float(tol)))
    if entry.key != key:
        raise BaselineError(path, f"{where} does not match its fields, which give key {entry.key!r}")
    return entry


SPREAD_FIX = ("re-measure the spread (`./kvq spread DIR`: kvcache_repro/runner/spread.py) and rewrite the band from "
              "it (`python -m kvcache_repro bands apply`), or restore the file from git")


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
            or not all(isinstance(k, str) and is_number(v) and math.isfinite(v) for k, v in observed.items())):
        raise BaselineError(path, f"{at}: 'observed' must be a non-empty object of label -> finite number",
                            SPREAD_FIX)
    if not is_number(margin) or not math.isfinite(margin) or margin < 1:
        raise BaselineError(path, f"{at}: 'margin' must be a number >= 1, got {margin!r}", SPREAD_FIX)
    if not is_number(floor) or not math.isfinite(floor) or floor < 0:
        raise BaselineError(path, f"{at}: 'floor' must be a finite number >= 0, got {floor!r}", SPREAD_FIX)
    if not isinstance(banded, bool) or not isinstance(note, str):
        raise BaselineError(path, f"{at}: 'banded' must be true/false and 'note' a string", SPREAD_FIX)
    spread = Spread({k: float(v) for k, v in observed.items()}, float(margin), float(floor), banded, note)
    if banded and not (ratio - tol - EDGE_SLACK <= spread.low and spread.high <= ratio + tol + EDGE_SLACK):
        raise BaselineError(path, f"{at}: the band {fmt_num(ratio)} +/- {fmt_num(tol)} does not hold the spread it was "
                                  f"cut from ({fmt_num(spread.low)}..{fmt_num(spread.high)})", SPREAD_FIX)
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
        if package not in provenance.PACKAGES:
            raise BaselineError(path, f"{at}: unknown package {package!r} (valid: {', '.join(provenance.PACKAGES)})",
                                RANGE_FIX)
        try:
            parse_range(releases)
        except ValueError as exc:
            raise BaselineError(path, f"{at}: {exc}", RANGE_FIX) from None
        if not is_number(ratio) or not math.isfinite(ratio) or ratio <= 0:
            raise BaselineError(path, f"{at}: field 'ratio' must be a finite number > 0, got {ratio!r}", RANGE_FIX)
        if not is_number(tol) or not math.isfinite(tol) or tol < 0:
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
    return check_ranges(path, where, out, produced_by)


def check_ranges(path, where, values, produced_by) -> tuple[ReleaseValue, ...]:
    """Per package: no two ranges overlap, none holds the release the entry's own ratio
    was recorded on."""
    values = sorted(values, key=lambda rv: (provenance.PACKAGES.index(rv.package), parse_range(rv.releases)))
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
    entries = {k: entry_from_json(path, k, v) for k, v in data["entries"].items()}
    return BaselineFile(path, data["scenario"], description, entries, key)


def dumps(baseline: BaselineFile) -> str:
    return json.dumps(baseline.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"


PREDICTED_KIND = "predicted"


def is_predicted(entry: Entry) -> bool:
    """The entry's value is a prediction (produced_by.kind), replaced by a measurement
    only through an update on the device it predicts."""
    return isinstance(entry.produced_by, dict) and entry.produced_by.get("kind") == PREDICTED_KIND
