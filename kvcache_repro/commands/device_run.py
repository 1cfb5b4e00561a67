"""every GPU scenario and pytest -m gpu under one deadline (./kvq device-run)"""
from __future__ import annotations

from kvcache_repro.commands import library_doc
from kvcache_repro.core import cli

LIBRARY = "gpu/device_run.py"
DEFAULT_BUDGET_S = 480.0  # the whole script: 8 minutes


def build_parser():
    from kvcache_repro.measure.scenarios import DEVICE_PLAN  # torch-free at import: --help lists the plan

    parser = cli.parser("./kvq device-run", library_doc(LIBRARY), [
        "./kvq device-run /tmp/kvq-out                     "
        "# on a CUDA box: every scenario, then pytest -m gpu",
        "./kvq device-run /tmp/kvq-dry --dry-run           # the same plan on the CPU (a tiny model)",
        "KVQ_SYSTEM_PYTHON=1 ./kvq device-run OUT --archive OUT/device-run.tar.gz   # offline box"],
        "0 every planned scenario ran and pytest -m gpu passed; 1 a scenario failed or was cut by the "
        "deadline, or pytest failed (SUMMARY.md and device-run.log say which); 2 bad arguments")
    parser.add_argument("outdir", help="where results, SUMMARY.md, logs and updated baselines go")
    parser.add_argument("--dry-run", action="store_true", help="the same script on the CPU with a tiny model")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for everything (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--scenarios", default=",".join(DEVICE_PLAN),
                        help=f"comma-separated, in order (default {','.join(DEVICE_PLAN)})")
    parser.add_argument("--no-pytest", action="store_true", help="skip the pytest -m gpu step")
    parser.add_argument("--no-default-allocator", action="store_true", help="skip the large batch's second run "
                        "under the default caching allocator (the plan runs under expandable segments)")
    parser.add_argument("--pytest-args", default="", help="extra arguments for the pytest step")
    parser.add_argument("--quanto-cuda-kernel", action="store_true", help="JIT-build and use quanto_cuda's "
                        "unpack (minutes) instead of quanto's Python unpack")
    parser.add_argument("--archive", default=None, help="also pack OUTDIR into this .tar.gz after every run")
    return parser


def run(args) -> int:
    from kvcache_repro.gpu import device_run

    return device_run.command(args)
