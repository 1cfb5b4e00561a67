"""Per-release baseline values from measurements on other releases of one package.

    python -m kvcache_repro release-baselines cpu-tiny 5.0.0=DIR 5.17.0=DIR ... [--write]
    python -m kvcache_repro release-baselines cpu-tiny --package torch 2.11.0=DIR ... [--write]

Each DIR is the ``--output-dir`` of ``python -m kvcache_repro experiment --scenario S
--in-process`` run with that release's interpreter (``../.compat-envs/transformers-V-*/
bin/python``: only that package differs from the pins). Per entry, the releases are sorted
and cut into runs of one value (as the store rounds it); a run becomes a range ``>=FIRST,<FIRST
OF THE NEXT RUN`` unless its value lies within the entry's own band or it holds the pinned
release. ``--write`` stores the ranges in the entry's ``by_release`` (baseline_update.update).
"""
from __future__ import annotations

import json
from pathlib import Path

from packaging.version import Version

from kvcache_repro.core.provenance import PACKAGES, device_label, package_versions, produced_by
from kvcache_repro.verdicts import baseline_file, release_ranges

ROUND = 4  # as experiment.update_baselines rounds stored ratios

OTHERS = tuple(p for p in PACKAGES if p != "transformers")  # pinned while transformers releases vary


def measured_ratios(results_dir: Path) -> dict[str, float]:
    data = json.loads((Path(results_dir) / "results.json").read_text())
    if not data.get("complete", False):
        raise SystemExit(f"{results_dir}: the run is not complete (failed or interrupted rows); rerun it")
    return {baseline_file.entry_key(r["backend"], r["batch"], r["metric"]): r["value"] for r in data["ratios"]}


def ranges_for(entry: baseline_file.Entry, by_release: dict[str, float], produced_by: dict,
               package: str = "transformers") -> list[release_ranges.ReleaseValue]:
    """The ranges worth storing for one entry from {release of ``package``: measured ratio}."""
    runs: list[list[str]] = []
    for rel in sorted(by_release, key=Version):
        if runs and round(by_release[runs[-1][-1]], ROUND) == round(by_release[rel], ROUND):
            runs[-1].append(rel)
        else:
            runs.append([rel])
    pinned = entry.pinned(package)
    if pinned and package == "torch":
        pinned = pinned.split("+")[0]  # 2.13.0+cpu: the release, not the build
    out = []
    for i, run in enumerate(runs):
        value = round(by_release[run[0]], ROUND)
        if pinned in run or abs(value - entry.ratio) <= entry.tolerance + 1e-9:
            continue
        if i + 1 < len(runs):
            high = runs[i + 1][0]
        elif pinned and Version(pinned) > Version(run[-1]):
            high = pinned  # unmeasured releases between the last one here and the pin: bounded by the pin
        else:
            raise SystemExit(f"{entry.key}: the newest releases measured ({', '.join(run)}) differ from the pin "
                             f"{pinned} and nothing newer was measured: measure the pin too, or update the pin's value")
        out.append(release_ranges.ReleaseValue(f">={run[0]},<{high}", value, entry.tolerance, tuple(run), produced_by,
                                               package))
    return out


def provenance(scenario: str, suite: str) -> dict:
    """The ranges' produced_by: the other packages' versions (pinned), no machine (each
    release was measured by its own interpreter)."""
    return produced_by(device_label("cpu"),
                       f"python -m kvcache_repro experiment --scenario {scenario} --in-process, run with each "
                       f"release's interpreter (../.compat-envs/transformers-V-*/); suite {suite}; "
                       f"python -m kvcache_repro release-baselines",
                       versions=package_versions(OTHERS), with_machine=False)

