"""the version-sensitive tests against other releases, into compat/RESULTS.md (./kvq compat)"""
from __future__ import annotations

from kvcache_repro.commands import library_doc
from kvcache_repro.core import cli
from kvcache_repro.core.provenance import PACKAGES

LIBRARY = "releases/compat.py"


def build_parser():
    from kvcache_repro.releases import compat  # torch- and packaging-free at import: the groups --help lists

    parser = cli.parser("./kvq compat", library_doc(LIBRARY), [
        "./kvq compat 5.17.0 5.20.2                        # transformers releases",
        "./kvq compat torch==2.14.1 hqq==0.2.7.post1       # other packages, the rest pinned",
        "./kvq compat transformers==5.17.0,torch==2.11.0   # a combination",
        "./kvq compat 'transformers @ file:///src/transformers'   # an unreleased build",
        "./kvq compat --latest [--pre]                     # the newest release of each package, asked of the index"],
        "; ".join(f"{code} {text}" for code, text in compat.EXIT_CODES.items())
        + " (of the specs run now; --report-only and --probe exit 0)")
    parser.add_argument("specs", nargs="*", metavar="SPEC",
                        help="a transformers version, or PACKAGE==VERSION / 'PACKAGE @ file:///path' / a wheel, "
                             "comma-joined for combinations (default: the pinned transformers)")
    parser.add_argument("--latest", action="store_true",
                        help="the newest release of each of " + ", ".join(PACKAGES) + " (pip index versions), "
                             "each alone against the pins and all of them together, besides any SPEC")
    parser.add_argument("--accept", metavar="SPEC", default=None,
                        help="accept what SPEC's stored run found changed, for that release: band misses "
                             "(re-measured in its environment) as per-release ranges of the baseline files, behaviour "
                             "misses that name a table value (and fixed pinned bugs) as ranges of the expectation "
                             "table (baselines/expectations.json); refuses anything else and a spec of several packages")
    parser.add_argument("--pre", action="store_true", help="with --latest: pre-releases count as newest")
    parser.add_argument("--full", action="store_true",
                        help=f"the whole tier ({compat.MARKERS}), not only the version-sensitive groups")
    parser.add_argument("--groups", default=None,
                        help=f"comma-separated test files (default {','.join(compat.DEFAULT_GROUPS)}, plus per "
                             f"swapped package: "
                             + "; ".join(f"{k}: {','.join(v)}" for k, v in compat.PACKAGE_GROUPS.items()) + ")")
    parser.add_argument("--probe", action="store_true",
                        help="only probe each spec's behaviours (seconds; for bisection) into compat/probes/")
    parser.add_argument("--report-only", action="store_true", help="only rewrite compat/RESULTS.md from compat/runs/")
    parser.add_argument("--no-speed", action="store_true",
                        help="skip the decode-time comparison with the pin (side by side, ~4 min a spec)")
    return parser


def run(args) -> int:
    """The runs (or probes) of each spec, then compat/RESULTS.md rewritten: the exit code."""
    import json
    import sys

    from kvcache_repro.releases import compat, package_specs, results

    root = compat.ROOT / "compat"
    runs_dir, probes_dir = root / "runs", root / "probes"
    runs_dir.mkdir(parents=True, exist_ok=True)
    clash = ("--pre needs --latest" if args.pre and not args.latest else
             "--accept takes one SPEC and no --latest, specs or --probe" if args.accept and (
                 args.latest or args.specs or args.probe) else "")
    if clash:
        print(f"kvq compat: {clash}", file=sys.stderr)
        return 2
    pins = package_specs.pinned(compat.ROOT)
    try:
        specs = [package_specs.parse(t) for t in args.specs]
        if args.latest:
            specs += latest_specs(args.pre)
    except (package_specs.SpecError, package_specs.IndexUnreachable) as error:
        print(f"kvq compat: {error}", file=sys.stderr)
        return 2
    specs = list({spec.label: spec for spec in specs or [package_specs.parse(pins["transformers"])]}.values())
    if args.accept:
        try:
            spec = package_specs.parse(args.accept)
        except package_specs.SpecError as error:
            print(f"kvq compat: {error}", file=sys.stderr)
            return 2
        stored = runs_dir / f"{spec.label}.json"
        return compat.accept_spec(spec, json.loads(stored.read_text()) if stored.exists() else None)
    chosen = tuple(args.groups.split(",")) if args.groups else None
    runs: list[dict] = []
    if args.probe:
        probes_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            probe = compat.probe_spec(spec)
            (probes_dir / f"{spec.label}.json").write_text(json.dumps(probe, indent=1) + "\n")
            print(json.dumps(probe)[:400])
    elif not args.report_only:
        for spec in specs:
            groups = None if args.full else compat.groups_for(spec, chosen)
            run = compat.run_spec(spec, groups, speed=not args.no_speed)
            (runs_dir / compat.run_file(run)).write_text(json.dumps(run, indent=1) + "\n")
            runs.append(run)
    notes = root / "notes.md"  # hand-written: what changed where (bisected)
    text = results.write_results(runs_dir, root / "RESULTS.md", probes_dir=probes_dir,
                                notes=notes.read_text().strip() if notes.exists() else "")
    print(text.split("## Per release")[0].split("## Matrix")[-1])
    code = compat.exit_code(runs)
    for run in runs:
        if problems := compat.row_problems(run):
            print(f"kvq compat: {run['release']}: {', '.join(problems)} (compat/RESULTS.md)", file=sys.stderr)
    print(f"kvq compat: exit {code}: {compat.EXIT_CODES[code]}", file=sys.stderr)
    return code


def latest_specs(pre: bool) -> list:
    """The specs of --latest, each said with the packages it checks."""
    from kvcache_repro.releases import compat, package_specs

    pins = package_specs.pinned(compat.ROOT)
    found = {package: package_specs.newest(package, pre) for package in PACKAGES}
    for package in PACKAGES:
        behind = "; the index is behind the pin" if package_specs.newer(pins[package], found[package]) else ""
        print(f"kvq compat --latest: {package} {found[package]} on the index (pin {pins[package]}{behind})")
    rows = package_specs.latest(pins, found)
    for row in rows:
        print(f"kvq compat --latest: row {row.spec.label} checks {', '.join(row.stands_for)}")
    return [row.spec for row in rows]


def main(argv: list[str] | None = None) -> int:
    """The ``kvq-compat`` script of an installed suite (and nox -s compat)."""
    from kvcache_repro import commands

    return commands.call("compat", argv)
