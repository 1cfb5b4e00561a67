"""The command line: ``python -m kvcache_repro VERB [args]``, one module per verb.

A verb module's ``build_parser()`` imports only torch-free modules, so ``--help`` answers
at once with a bare ``python3``; ``run(args) -> int`` does the work, and its
``cli.UsageError`` exits 2 with the usage, as argparse's errors do.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from kvcache_repro.core import cli

PACKAGE = Path(__file__).resolve().parents[1]
PROG = "python -m kvcache_repro"
# in the order the verb list shows them; the module of "a-b" is a_b
VERBS = ("experiment", "compat", "side-by-side", "device-run", "spread", "bundle", "bands",
         "release-baselines")


def load(verb: str):
    """The module of ``verb`` (imports only what its parser needs)."""
    return importlib.import_module(f"{__name__}.{verb.replace('-', '_')}")


def library_doc(path: str) -> str:
    """The docstring of the library module at ``path``, read from the source (no torch import)."""
    return ast.get_docstring(ast.parse((PACKAGE / path).read_text(encoding="utf-8"))) or ""


def call(verb: str, argv: list[str] | None = None) -> int:
    """Parse ``argv`` with ``verb``'s parser and run it: its exit code. A bad selection (an
    unknown scenario or backend, a KVQ_SCENARIOS file that is no valid scenario) exits 2."""
    module = load(verb)
    try:
        parser = module.build_parser()
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        return module.run(args)
    except cli.UsageError as error:
        parser.error(str(error))
    except ValueError as error:
        from kvcache_repro.backends.matrix import SelectionError  # torch-free

        if not isinstance(error, SelectionError):
            raise
        print(f"{PROG} {verb}: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m kvcache_repro [help | VERB [args]]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["help"] and argv[1:2] and argv[1] in VERBS:  # help VERB: that verb's --help
        return call(argv[1], ["--help"])
    if not argv or argv[0] in ("help", "-h", "--help"):
        print(f"usage: {PROG} VERB [args]        ({PROG} VERB --help: one verb's options)\n\nverbs:")
        for verb in VERBS:
            print(f"  {verb:<18} {(load(verb).__doc__ or '').strip().splitlines()[0]}")
        print("\n./kvq runs these after its setup (the venv with the pins); "
              "./kvq help lists its own commands.\n"
              "Exit codes: the verb's (its --help says them); 2 an unknown verb or bad arguments.")
        return 0
    if argv[0] not in VERBS:
        print(f"{PROG}: unknown verb {argv[0]!r}; the verbs: {', '.join(VERBS)} ({PROG} help)",
              file=sys.stderr)
        return 2
    return call(argv[0], argv[1:])
