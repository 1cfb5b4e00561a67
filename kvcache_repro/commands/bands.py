"""bands cut from the spread runs, written into the baseline entries"""
from __future__ import annotations

from pathlib import Path

from kvcache_repro.commands import library_doc
from kvcache_repro.core import cli

LIBRARY = "verdicts/bands.py"


def build_parser():
    p = cli.parser("python -m kvcache_repro bands", library_doc(LIBRARY), [
        "python -m kvcache_repro bands apply baselines/spread/*/*.json          # print the bands",
        "python -m kvcache_repro bands apply baselines/spread/*/*.json --write  # store them"],
        "0 done; 2 bad arguments; a run file or baseline that cannot be read stops with its path and the fix")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply", help="cut bands from the runs given; --write stores them")
    a.add_argument("runs", nargs="+", type=Path)
    a.add_argument("--write", action="store_true")
    return p


def run(args) -> int:
    from kvcache_repro.verdicts import bands

    for line in bands.apply(bands.load_runs(args.runs), args.write):
        print(line)
    return 0
