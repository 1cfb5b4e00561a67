"""A run's values written into a baseline file, atomically (never from a failed run), keeping
each stored entry's band, per-release values and spread."""
from __future__ import annotations

from pathlib import Path

from kvcache_repro.core.atomic import write_atomic
from kvcache_repro.verdicts.bands import band, machine_label
from kvcache_repro.verdicts.baseline_file import (EDGE_SLACK, UPDATE_COMMAND, BaselineError, Entry, Spread,
                                                  check_ranges, dumps, entry_from_json, fmt_num, is_predicted, load)


def update(path, entries: list[Entry], *, run_failed: bool, scenario: str,
           description: str = "", reset_tolerance: bool = False, key: dict | None = None,
           ranges_complete: bool = False) -> list[str]:
    """Write ``entries`` into ``path``. A stored entry keeps its tolerance (a band is a decision,
    not re-cut by a re-run) unless ``reset_tolerance``, and its ``by_release`` values but those
    a given entry holds for the same package and releases (``ranges_complete``: a given
    entry's ``by_release`` is the whole list)."""
    path = Path(path)
    rerun = f"fix the run and rerun `{UPDATE_COMMAND}`; the file was left untouched"
    if run_failed:  # numbers from a failed run would silently become the new normal
        raise BaselineError(path, "refusing to update baselines from a failed run", rerun)
    if not entries:
        raise BaselineError(path, "refusing to update baselines with no entries", rerun)
    fresh: dict[str, Entry] = {}
    for e in entries:
        if e.key in fresh:
            raise BaselineError(path, f"entry {e.key!r} given twice", rerun)
        fresh[e.key] = entry_from_json(path, e.key, e.to_json())  # never write what load would reject
        for rv in e.by_release:
            if abs(rv.ratio - e.ratio) <= e.tolerance + EDGE_SLACK:  # it would hide a release like the pin
                raise BaselineError(path, f"entry {e.key!r}: the value {fmt_num(rv.ratio)} for {rv.releases} lies in "
                                          f"the entry's own band ({fmt_num(e.ratio)} +/- {fmt_num(e.tolerance)})",
                                    "store a per-release value only where it differs from the entry's ratio "
                                    "by more than its tolerance")
    current = load(path)  # raises on a corrupt file, which is then never overwritten
    if path.exists() and current.scenario != scenario:
        raise BaselineError(path, f"file holds scenario {current.scenario!r}, not {scenario!r}",
                            "pass the baseline file that belongs to this scenario")
    if path.exists() and key is not None and current.key not in (None, key):
        raise BaselineError(path, f"file holds the baselines of another setup ({current.key}), not of {key}",
                            "leave it: a setup of its own gets a file of its own (its name is a digest of the key)")
    lines = []
    for k, e in fresh.items():
        old = current.entries.get(k)
        line = f"{k}: {'new' if old is None else fmt_num(old.ratio)} -> "
        if old is not None:
            # A measurement replaces a prediction whole, band included (that is the prediction's).
            replaces_prediction = is_predicted(old) and not is_predicted(e)
            tolerance = e.tolerance if reset_tolerance or replaces_prediction else old.tolerance
            given = {(rv.package, rv.releases) for rv in e.by_release}
            kept = [] if ranges_complete else [rv for rv in old.by_release if (rv.package, rv.releases) not in given]
            ratio, spread = e.ratio, e.spread
            if old.spread is not None and spread is None:  # re-cut from the spread (a reset too)
                ratio, tolerance, spread = merge_spread(old, e, keep_width=not reset_tolerance)
            # Validated again: the new pinned release must not lie in a kept range.
            e = Entry(e.backend, e.batch, e.metric, ratio, tolerance, e.produced_by,
                      check_ranges(path, f"entry {k!r}", kept + list(e.by_release), e.produced_by), spread)
        line += fmt_num(e.ratio)
        if old is not None and is_predicted(old) and not is_predicted(e):
            line += " (a measurement replaces the prediction)"
        if old is not None and old.tolerance != e.tolerance:
            line += f" (tolerance {fmt_num(old.tolerance)} -> {fmt_num(e.tolerance)})"
        if e.by_release:
            line += f" (per-release values kept for {', '.join(rv.releases for rv in e.by_release)})"
        lines.append(line)
        current.entries[k] = e
    current.scenario = scenario
    current.key = key if key is not None else current.key
    current.description = description or current.description
    write_atomic(path, dumps(current))
    return lines


def merge_spread(old: Entry, new: Entry, keep_width: bool = True) -> tuple[float, float, Spread]:
    """One machine's value added to the stored spread (other package versions start it anew),
    the band cut again, never narrower than stored unless not ``keep_width``."""
    same_versions = old.produced_by.get("versions") == new.produced_by.get("versions")
    observed = dict(old.spread.observed) if same_versions else {}
    observed[machine_label(new.produced_by)] = new.ratio
    centre, tol = band(observed, old.spread.margin, old.spread.floor)
    spread = Spread(observed, old.spread.margin, old.spread.floor, old.spread.banded, old.spread.note)
    return centre, max(tol, old.tolerance) if keep_width else tol, spread


def release_line(release: str) -> str:
    """The range of one release line, ``">=5.26.0,<5.26.1"`` (its post-releases, and its final
    after a release candidate, included): what one observation supports."""
    from packaging.version import Version

    numbers = [*Version(release).release, 0, 0][:max(3, len(Version(release).release))]
    numbers[-1] += 1
    return f">={release},<{'.'.join(map(str, numbers))}"


def accept(path, moved: dict[str, float], package: str, release: str, produced_by: dict) -> list[str]:
    """``./kvq compat --accept``: each moved entry's value on ``release`` of ``package`` stored as
    a per-release value (``by_release``) of that release line, joined to a stored range of the
    same value that ends where it starts; the entry's own ratio stays the pin's. Refuses the
    pinned release itself and a release line overlapping a stored range of another value (a
    release candidate's line gives way to its final's)."""
    from packaging.version import Version

    from kvcache_repro.verdicts.release_ranges import RANGE_COMMAND, ReleaseValue, parse_range

    path = Path(path)
    current = load(path)  # a corrupt file raises and is never overwritten
    entries = []
    for key, value in sorted(moved.items()):
        e = current.entries.get(key)
        if e is None:
            raise BaselineError(path, f"entry {key!r} is missing", "record it first (a missing entry is not a change)")
        value = float(f"{value:.6g}")  # as first recorded: 4 decimals would zero a KL of 4e-5
        own = [rv for rv in e.by_release if rv.package == package]
        new = release_line(release)
        # a release candidate's line gives way to its final (observed on pre-releases of this line only)
        candidates = [rv for rv in own if all(Version(o).is_prerelease and Version(o).release == Version(release).release
                                              for o in rv.observed_on) and not Version(release).is_prerelease]
        own = [rv for rv in own if rv not in candidates]
        if clash := [rv for rv in own if _overlap(rv.releases, new)]:
            raise BaselineError(path, f"entry {key!r}: {package} {release} ({new}) overlaps the stored range "
                                      f"{clash[0].releases} ({fmt_num(clash[0].ratio)}), measured {fmt_num(value)}",
                                f"re-measure that range's releases and cut it again with `{RANGE_COMMAND}`")
        joined = [rv for rv in own if parse_range(rv.releases)[1] == parse_range(new)[0]
                  and abs(rv.ratio - value) <= rv.tolerance + EDGE_SLACK]
        if joined:
            low = joined[0].releases.split(",")[0]
            rv = ReleaseValue(f"{low},<{new.split(',<')[1]}", joined[0].ratio, joined[0].tolerance,
                              (*joined[0].observed_on, release), produced_by, package)
        else:
            rv = ReleaseValue(new, value, e.tolerance, (release,), produced_by, package)
        kept = [r for r in e.by_release if r not in joined and r not in candidates]
        entries.append(Entry(e.backend, e.batch, e.metric, e.ratio, e.tolerance, e.produced_by,
                             (*kept, rv), e.spread))
    return [line + f" [{package} {release}: accepted]" for line in update(
        path, entries, run_failed=False, scenario=current.scenario, key=current.key, ranges_complete=True)]


def _overlap(a: str, b: str) -> bool:
    from kvcache_repro.verdicts.release_ranges import below, parse_range

    (a_low, a_high), (b_low, b_high) = parse_range(a), parse_range(b)
    return below(a_low, b_high) and below(b_low, a_high)
