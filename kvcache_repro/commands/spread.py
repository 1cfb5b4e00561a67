"""every stored CPU quantity under each CPU path, and its spread (./kvq spread DIR: run)"""
from __future__ import annotations

from pathlib import Path

from kvcache_repro.commands import library_doc
from kvcache_repro.core import cli

LIBRARY = "runner/spread.py"


def build_parser():
    from kvcache_repro.runner.spread import DEFAULT_PARTS, PARTS, PATHS  # torch-free: names --help lists

    p = cli.parser("python -m kvcache_repro spread", library_doc(LIBRARY), [
        "./kvq spread baselines/spread/my-machine         # run: every path, one after another (~2.5 min each)",
        "python -m kvcache_repro spread table baselines/spread/*/*.json"],
        "0 every path measured (or the table printed); 1 a path failed or hit its time limit (its file "
        "says so; the others are kept); 2 bad arguments")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="measure in this process, write OUT")
    m.add_argument("out", type=Path)
    m.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(DEFAULT_PARTS))
    r = sub.add_parser("run", help="measure each path in a fresh process, into DIR (what ./kvq spread DIR runs)")
    r.add_argument("dir", type=Path)
    r.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    r.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(DEFAULT_PARTS))
    t = sub.add_parser("table", help="the spread of the files given")
    t.add_argument("files", nargs="+", type=Path)
    return p


def run(args) -> int:
    from kvcache_repro.runner import spread

    return spread.command(args)
