"""What every command-line entry says for ``--help``: its docstring's first paragraph whole."""
from __future__ import annotations

import argparse
import textwrap


def parser(prog: str, doc: str, examples: list[str], exit_codes: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser: ``doc``'s first paragraph, ``examples`` (one a line) and ``exit_codes``."""
    wrap = dict(break_on_hyphens=False, break_long_words=False)  # words stay whole: the text can be searched
    description = textwrap.fill(" ".join(doc.strip().split("\n\n")[0].split()), 90, **wrap)
    epilog = ("examples:\n" + "\n".join(f"  {line}" for line in examples)
              + "\nexit codes:\n" + textwrap.indent(textwrap.fill(" ".join(exit_codes.split()), 88, **wrap), "  "))
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


class UsageError(Exception):
    """Arguments argparse accepted that do not fit together, or a name known only once the
    libraries are imported: kvcache_repro.commands turns it into ``parser.error`` (exit 2)."""
