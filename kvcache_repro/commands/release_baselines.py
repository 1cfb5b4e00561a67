"""per-release baseline values from experiment runs on other releases of one package"""
from __future__ import annotations

from kvcache_repro.commands import library_doc
from kvcache_repro.core import cli

LIBRARY = "verdicts/release_baselines.py"


def build_parser():
    from kvcache_repro.core.provenance import PACKAGES  # stdlib only at import

    parser = cli.parser("python -m kvcache_repro release-baselines", library_doc(LIBRARY), [
        "python -m kvcache_repro release-baselines cpu-tiny 5.0.0=DIR 5.17.0=DIR",
        "python -m kvcache_repro release-baselines cpu-tiny --package torch 2.11.0=DIR --write"],
        "0 done; 2 bad arguments; a run that is incomplete, or ranges that cannot be cut (the newest "
        "releases differ from the pin and nothing newer was measured), stop with the reason")
    parser.add_argument("scenario")
    parser.add_argument("runs", nargs="+", metavar="RELEASE=DIR")
    parser.add_argument("--write", action="store_true", help="store the ranges in baselines/SCENARIO.json")
    parser.add_argument("--suite", default="?", help="the suite commit that measured (recorded in provenance)")
    parser.add_argument("--package", default="transformers", choices=PACKAGES,
                        help="whose releases RELEASE names (the others pinned; default transformers)")
    return parser


def run(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from packaging.version import Version

    from kvcache_repro.verdicts import baseline_file, baseline_update, release_baselines

    path = baseline_file.BASELINE_DIR / f"{args.scenario}.json"
    stored = baseline_file.load(path)
    measured = {}
    for release, _, directory in (item.partition("=") for item in args.runs):
        Version(release)
        measured[release] = release_baselines.measured_ratios(Path(directory))
    produced = release_baselines.provenance(args.scenario, args.suite)
    updated = []
    for key, entry in sorted(stored.entries.items()):
        values = {rel: ratios[key] for rel, ratios in measured.items() if key in ratios}
        print(f"{key}: pin {args.package} {entry.pinned(args.package)} {entry.ratio} +/- {entry.tolerance}; "
              + ", ".join(f"{rel} {values[rel]:.4f}" for rel in sorted(values, key=Version)))
        found = release_baselines.ranges_for(entry, values, produced, args.package)
        for rv in found:
            print(f"  range {rv.releases}: {rv.ratio} (observed on {', '.join(rv.observed_on)})")
        if found:
            updated.append(replace(entry, by_release=tuple(found)))
    if args.write and updated:
        for line in baseline_update.update(path, updated, run_failed=False, scenario=stored.scenario):
            print("wrote", line)
    return 0
