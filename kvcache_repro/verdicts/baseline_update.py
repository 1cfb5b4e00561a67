"""A run's values written into a baseline file (verdicts/baseline_file.py), atomically:
refused from a failed run, keeping each stored entry's band, per-release values and
spread (a run on one machine adds its value to the spread the band is cut from)."""
from __future__ import annotations

from pathlib import Path

from kvcache_repro.core.atomic import write_atomic
from kvcache_repro.verdicts.bands import band, machine_label
from kvcache_repro.verdicts.baseline_file import (EDGE_SLACK, UPDATE_COMMAND, BaselineError, Entry, Spread,
                                                  check_ranges, dumps, entry_from_json, fmt_num, is_predicted, load)


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
        fresh[e.key] = entry_from_json(path, e.key, e.to_json())
        for rv in e.by_release:
            if abs(rv.ratio - e.ratio) <= e.tolerance + EDGE_SLACK:
                # Such a range compares as the entry's own ratio does: it would only hide
                # that the release behaves like the pin.
                raise BaselineError(path, f"entry {e.key!r}: the value {fmt_num(rv.ratio)} for {rv.releases} lies in "
                                          f"the entry's own band ({fmt_num(e.ratio)} +/- {fmt_num(e.tolerance)})",
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
                      check_ranges(path, f"entry {key!r}", kept + list(e.by_release), e.produced_by), spread)
        line = f"{key}: {'new' if old is None else fmt_num(old.ratio)} -> {fmt_num(e.ratio)}"
        if old is not None and is_predicted(old) and not is_predicted(e):
            line += " (a measurement replaces the prediction)"
        if old is not None and old.tolerance != e.tolerance:
            line += f" (tolerance {fmt_num(old.tolerance)} -> {fmt_num(e.tolerance)})"
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


def merge_spread(old: Entry, new: Entry, keep_width: bool = True) -> tuple[float, float, Spread]:
    """An update on one machine adds its value to the stored spread; the band is cut
    again from all of it and never comes out narrower than the stored one. A run on
    other package versions starts the observations anew (the old ones describe other
    code) but keeps the stored width: the spread between machines is re-measured with
    `./kvq spread`, not guessed from one machine. ``keep_width`` False
    (--reset-tolerances): the band is what the observations give, the stored width aside."""
    same_versions = old.produced_by.get("versions") == new.produced_by.get("versions")
    observed = dict(old.spread.observed) if same_versions else {}
    observed[machine_label(new.produced_by)] = new.ratio
    centre, tol = band(observed, old.spread.margin, old.spread.floor)
    spread = Spread(observed, old.spread.margin, old.spread.floor, old.spread.banded, old.spread.note)
    return centre, max(tol, old.tolerance) if keep_width else tol, spread
