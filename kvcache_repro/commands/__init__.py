"""The command line: ``python -m kvcache_repro VERB [args]``, one module per verb (what
``./kvq`` hands every Python command to).

Each verb module has ``build_parser()`` and ``run(args) -> int``. ``build_parser`` imports
only the standard library, ``core.cli`` and, where its help lists them, names from a
library module that is torch-free at import (the scenarios, the CPU paths): ``--help``
answers in a fraction of a second with a bare ``python3``, before any venv exists
(tests/test_cli.py checks it). Its description is the first paragraph of the library
module's docstring, read from the source (``library_doc``), not imported. ``run`` imports
the library and does the work; arguments that turn out not to fit together there raise
``cli.UsageError``, which exits 2 with the usage as argparse's own errors do.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from kvcache_repro.core import cli

PACKAGE = Path(__file__).resolve().parents[1]
PROG = "python -m kvcache_repro"

# verb -> its module in this package, in the order the verb list shows them
VERBS = {
    "experiment": "experiment",
    "compat": "compat",
    "side-by-side": "side_by_side",
    "device-run": "device_run",
    "spread": "spread",
    "bundle": "bundle",
    "bands": "bands",
    "release-baselines": "release_baselines",
}


def load(verb: str):
    """The module of ``verb`` (imports only what its parser needs)."""
    return importlib.import_module(f"{__name__}.{VERBS[verb]}")


def library_doc(path: str) -> str:
    """The docstring of the library module at ``path`` (relative to the package), read from
    its source: importing the module would import torch."""
    import ast

    return ast.get_docstring(ast.parse((PACKAGE / path).read_text(encoding="utf-8"))) or ""


def usage() -> str:
    """The verb list, one line each."""
    lines = [f"usage: {PROG} VERB [args]        ({PROG} VERB --help: one verb's options)", "", "verbs:"]
    for verb in VERBS:
        summary = (load(verb).__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {verb:<18} {summary}")
    lines += ["", "./kvq runs these after its setup (the venv with the pins); ./kvq help lists its own commands.",
              "Exit codes: the verb's (its --help says them); 2 an unknown verb or bad arguments."]
    return "\n".join(lines)


def call(verb: str, argv: list[str] | None = None) -> int:
    """Parse ``argv`` with ``verb``'s parser and run it: its exit code; bad arguments exit 2."""
    module = load(verb)
    parser = module.build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return module.run(args)
    except cli.UsageError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    """``python -m kvcache_repro [help | VERB [args]]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("help", "-h", "--help"):
        if len(argv) > 1 and argv[0] == "help" and argv[1] in VERBS:  # help VERB: that verb's --help
            return call(argv[1], ["--help"])
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"{PROG}: unknown verb {verb!r}; the verbs: {', '.join(VERBS)} ({PROG} help)", file=sys.stderr)
        return 2
    return call(verb, rest)
