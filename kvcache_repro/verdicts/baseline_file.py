"""Stored baselines, one JSON file per scenario, read and validated: per entry the ratio of a
metric for a quantized backend to the unquantized run at its batch size, for the pinned
transformers release (its ``produced_by``), and ``by_release`` values for ranges of other
releases (verdicts/release_ranges.py). Stdlib and ``packaging`` only: no torch."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion

from kvcache_repro.core import metrics, provenance
from kvcache_repro.verdicts.release_ranges import RANGE_COMMAND, RANGE_FIX, ReleaseValue, below, in_range, parse_range

BASELINE_DIR = Path(__file__).resolve().parents[2] / "baselines"

UPDATE_COMMAND = "./kvq experiment --update-baselines"
UPDATE_HINT = f"`{UPDATE_COMMAND}` (or `pytest -m ... --kv-update-baselines`)"

# Records only the entries with no stored value, leaving every stored one as it is.
RECORD_COMMAND = "./kvq experiment --record-missing-baselines"
RECORD_HINT = f"`{RECORD_COMMAND}` (or {UPDATE_HINT}, which also rewrites stored entries)"

# A ratio printed as exactly the band edge may sit one ulp outside it: the band is inclusive.
EDGE_SLACK = 1e-9

SPREAD_FIX = ("re-measure the spread (`./kvq spread DIR`: kvcache_repro/runner/spread.py) and rewrite the band from "
              "it (`python -m kvcache_repro bands apply`), or restore the file from git")
PREDICTED_KIND = "predicted"


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
    """What an entry's band is cut from (``bands.band``): the value on each machine and CPU
    path (``observed``: label -> value), ``margin`` and ``floor``. ``banded`` False: reported,
    not compared (too wide to catch anything). ``note``: why, or what the band catches."""

    observed: dict[str, float]
    margin: float
    floor: float
    banded: bool = True
    note: str = ""

    @property
    def bounds(self) -> tuple[float, float]:
        return min(self.observed.values()), max(self.observed.values())

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

    def pinned(self, package: str) -> str | None:
        """The release of ``package`` the entry's own ratio was recorded on."""
        versions = self.produced_by.get("versions")
        return versions.get(package) if isinstance(versions, dict) else None

    @property
    def allocator(self) -> str | None:
        """The CUDA allocator configuration the entry was taken (or predicted) under."""
        settings = self.produced_by.get("settings")
        return settings.get("allocator") if isinstance(settings, dict) else None

    def value_for(self, transformers_version: str | None, versions: dict[str, str] | None = None
                  ) -> ReleaseValue | None:
        """The first per-release value whose range holds its package's running release, or None."""
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
        out = {"backend": self.backend, "batch": self.batch, "metric": self.metric, "ratio": self.ratio,
               "tolerance": self.tolerance, "produced_by": self.produced_by}
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
    key: dict | None = None  # what a user's model's numbers depend on (built-in scenarios: None)

    def to_json(self) -> dict:
        out = {"scenario": self.scenario, "description": self.description,
               "entries": {k: e.to_json() for k, e in self.entries.items()}}
        if self.key is not None:  # files without a key keep their format
            out["key"] = self.key
        return out


def entry_key(backend: str, batch: int, metric: str) -> str:
    return f"{backend}/b{batch}/{metric}"


def holder(files: list["BaselineFile"], key: str, allocator: str | None = None) -> "BaselineFile":
    """The first of ``files`` holding ``key`` (paths.compared_files' order) - for an allocator-
    dependent metric the first whose entry was taken under ``allocator``, if one was - else the
    first (where a record of it goes)."""
    holding = [f for f in files if key in f.entries]
    if allocator is not None and metrics.METRICS[key.rsplit("/", 1)[-1]].allocator_dependent:
        holding = [f for f in holding if f.entries[key].allocator == allocator] or holding
    return holding[0] if holding else files[0]


def is_number(x) -> bool:  # `true` (an int subclass) in a baseline file is a typo, not a ratio
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _at_least(x, low: float, strict: bool = False) -> bool:
    try:
        return is_number(x) and math.isfinite(x) and (x > low if strict else x >= low)
    except OverflowError:  # an integer past float's range: 1e400 written out
        return False


def _fields(path, at: str, raw, fields: tuple[str, ...], fix: str | None = None) -> list:
    if not isinstance(raw, dict):
        raise BaselineError(path, f"{at} must be an object, got {type(raw).__name__}", fix)
    if missing := [f for f in fields if f not in raw]:
        raise BaselineError(path, f"{at} is missing field(s) {', '.join(missing)}", fix)
    return [raw[f] for f in fields]


def _check_band(path, at: str, ratio, tol, fix: str | None = None) -> None:
    if not _at_least(ratio, 0, strict=True):
        raise BaselineError(path, f"{at}: field 'ratio' must be a finite number > 0, got {ratio!r}", fix)
    if not _at_least(tol, 0):
        raise BaselineError(path, f"{at}: field 'tolerance' must be a finite number >= 0, got {tol!r}", fix)


def entry_from_json(path, key, raw) -> Entry:
    where = f"entry {key!r}"
    fields = ("backend", "batch", "metric", "ratio", "tolerance", "produced_by")
    backend, batch, metric, ratio, tol, produced_by = _fields(path, where, raw, fields)
    if not isinstance(backend, str) or not backend:
        raise BaselineError(path, f"{where}: field 'backend' must be a non-empty string")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise BaselineError(path, f"{where}: field 'batch' must be a positive integer, got {batch!r}")
    if not isinstance(metric, str) or metric not in metrics.METRICS:
        raise BaselineError(path, f"{where}: unknown metric {metric!r} (valid: {', '.join(metrics.METRICS)})")
    _check_band(path, where, ratio, tol)
    if not isinstance(produced_by, dict):
        raise BaselineError(path, f"{where}: field 'produced_by' must be an object")
    entry = Entry(backend, batch, metric, float(ratio), float(tol), produced_by,
                  _release_values_from_json(path, where, raw.get("by_release", []), produced_by),
                  _spread_from_json(path, where, raw.get("spread"), float(ratio), float(tol)))
    if entry.key != key:
        raise BaselineError(path, f"{where} does not match its fields, which give key {entry.key!r}")
    return entry


def _spread_from_json(path, where, raw, ratio: float, tol: float) -> Spread | None:
    """An entry's ``spread``, whose values its band must hold (else it fails on a listed machine)."""
    if raw is None:
        return None
    at = f"{where}, spread"
    _fields(path, at, raw, (), SPREAD_FIX)
    observed, margin, floor = raw.get("observed"), raw.get("margin"), raw.get("floor")
    banded, note = raw.get("banded", True), raw.get("note", "")
    if (not isinstance(observed, dict) or not observed
            or not all(isinstance(k, str) and _at_least(v, -math.inf) for k, v in observed.items())):
        raise BaselineError(path, f"{at}: 'observed' must be a non-empty object of label -> finite number",
                            SPREAD_FIX)
    if not _at_least(margin, 1):
        raise BaselineError(path, f"{at}: 'margin' must be a number >= 1, got {margin!r}", SPREAD_FIX)
    if not _at_least(floor, 0):
        raise BaselineError(path, f"{at}: 'floor' must be a finite number >= 0, got {floor!r}", SPREAD_FIX)
    if not isinstance(banded, bool) or not isinstance(note, str):
        raise BaselineError(path, f"{at}: 'banded' must be true/false and 'note' a string", SPREAD_FIX)
    spread = Spread({k: float(v) for k, v in observed.items()}, float(margin), float(floor), banded, note)
    lo, hi = spread.bounds
    if banded and not (ratio - tol - EDGE_SLACK <= lo and hi <= ratio + tol + EDGE_SLACK):
        raise BaselineError(path, f"{at}: the band {fmt_num(ratio)} +/- {fmt_num(tol)} does not hold the spread it was "
                                  f"cut from ({fmt_num(lo)}..{fmt_num(hi)})", SPREAD_FIX)
    return spread


def _release_values_from_json(path, where, raw, produced_by) -> tuple[ReleaseValue, ...]:
    if not isinstance(raw, list):
        raise BaselineError(path, f"{where}: field 'by_release' must be a list, got {type(raw).__name__}",
                            RANGE_FIX)
    out = []
    for i, item in enumerate(raw):
        at = f"{where}, by_release[{i}]"
        fields = ("releases", "ratio", "tolerance", "observed_on", "produced_by")
        releases, ratio, tol, seen, prov = _fields(path, at, item, fields, RANGE_FIX)
        package = item.get("package", "transformers")
        if package not in provenance.PACKAGES:
            raise BaselineError(path, f"{at}: unknown package {package!r} (valid: {', '.join(provenance.PACKAGES)})",
                                RANGE_FIX)
        try:
            parse_range(releases)
        except ValueError as exc:
            raise BaselineError(path, f"{at}: {exc}", RANGE_FIX) from None
        _check_band(path, at, ratio, tol, RANGE_FIX)
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
    """Per package: no two ranges overlap, none holds the release of the entry's own ratio."""
    values = sorted(values, key=lambda rv: (provenance.PACKAGES.index(rv.package), parse_range(rv.releases)))
    for a, b in zip(values, values[1:]):
        if a.package == b.package and below(parse_range(b.releases)[0], parse_range(a.releases)[1]):
            raise BaselineError(path, f"{where}: {a.package} ranges {a.releases} and {b.releases} overlap", RANGE_FIX)
    versions = produced_by.get("versions") if isinstance(produced_by, dict) else None
    for rv in values:
        pinned = versions.get(rv.package) if isinstance(versions, dict) else None
        try:
            holds = bool(pinned) and in_range(rv.releases, pinned)
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
    except FileNotFoundError:  # a scenario nobody has recorded yet: every comparison says "missing"
        return BaselineFile(path, path.stem, "", {})
    except UnicodeDecodeError as exc:
        raise BaselineError(path, f"not UTF-8 text ({exc})") from None
    return parse(path, text)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse(path, text: str) -> BaselineFile:
    """The baseline file ``text`` (read from ``path``), validated as ``load`` does."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise BaselineError(path, f"not valid JSON ({exc})") from None
    except _DuplicateKey as exc:  # json keeps the last: an update would write the other away
        raise BaselineError(path, f"key {exc.args[0]!r} appears twice in one object (a merge gone wrong?)") from None
    if not isinstance(data, dict):
        raise BaselineError(path, f"top level must be an object, got {type(data).__name__}")
    for field, kind in (("scenario", str), ("entries", dict)):
        if field not in data:
            raise BaselineError(path, f"missing top-level field {field!r}")
        if not isinstance(data[field], kind):
            raise BaselineError(path, f"top-level field {field!r} must be a {kind.__name__}")
    description, key = data.get("description", ""), data.get("key")
    if not isinstance(description, str):
        raise BaselineError(path, "top-level field 'description' must be a string")
    if key is not None and not isinstance(key, dict):
        raise BaselineError(path, "top-level field 'key' must be an object (what the file's numbers depend on)")
    entries = {k: entry_from_json(path, k, v) for k, v in data["entries"].items()}
    return BaselineFile(path, data["scenario"], description, entries, key)


def dumps(baseline: BaselineFile) -> str:
    return json.dumps(baseline.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"


def is_predicted(entry: Entry) -> bool:
    """The entry's value is a prediction (produced_by.kind), not a measurement."""
    return isinstance(entry.produced_by, dict) and entry.produced_by.get("kind") == PREDICTED_KIND
