"""the wheels an offline CUDA box lacks: make, install, check (./kvq bundle, ./kvq check)"""
from __future__ import annotations

from kvcache_repro.commands import library_doc
from kvcache_repro.core import cli

LIBRARY = "gpu/bundle.py"


def build_parser():
    from kvcache_repro.gpu.bundle import DEFAULT_DIR  # stdlib only: it runs before anything is installed

    parser = cli.parser("python -m kvcache_repro bundle", library_doc(LIBRARY), [
        "./kvq bundle                                      # make, here, with PyPI: gpu-bundle/",
        "python -m kvcache_repro bundle install gpu-bundle   # there, offline",
        "python -m kvcache_repro bundle check              # what ./kvq check runs"],
        "0 done (check: everything imports); 1 a wheel could not be made or installed, or check found "
        "something missing (named); 2 bad arguments")
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="download/build the wheels the box lacks (needs PyPI)")
    p_make.add_argument("dir", nargs="?", default=str(DEFAULT_DIR))
    p_make.add_argument("--no-transformers", action="store_true",
                        help="use the box's transformers instead of the pinned one (and leave regex out)")
    p_install = sub.add_parser("install", help="install DIR/*.whl into DIR-site offline (--target)")
    p_install.add_argument("dir", nargs="?", default=str(DEFAULT_DIR))
    sub.add_parser("check", help="what imports, and version drift against the pins")
    return parser


def run(args) -> int:
    from kvcache_repro.gpu import bundle

    return bundle.command(args)
