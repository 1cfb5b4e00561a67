"""decode time of another environment against this one, interleaved (./kvq side-by-side)"""
from __future__ import annotations

import sys

from kvcache_repro.commands import library_doc
from kvcache_repro.core import cli

LIBRARY = "releases/side_by_side.py"


def build_parser():
    from kvcache_repro.releases.side_by_side import CACHE_MODEL, DEFAULT_SETUP  # torch-free at import

    parser = cli.parser("./kvq side-by-side", library_doc(LIBRARY), [
        "./kvq side-by-side --candidate ENV/bin/python     # against this environment's python",
        "python -m kvcache_repro side-by-side --baseline .venv/bin/python --candidate ENV/bin/python",
        "python -m kvcache_repro side-by-side --baseline P --candidate P \\",
        "    --candidate-env KVQ_FAULT=dequantize_half_again   # a 1.5x dequantize: reads slower"],
        "0 no backend is slower in the candidate; 1 one is (or a worker failed); 2 bad arguments")
    parser.add_argument("--baseline", default=sys.executable,
                        help="the pinned environment's python (default: this one)")
    parser.add_argument("--candidate", required=True, help="the other environment's python")
    parser.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--candidate-env", action="append", default=[], metavar="KEY=VALUE")
    # the names come from speed.py, which imports torch: checked when the comparison starts
    parser.add_argument("--setup", default=DEFAULT_SETUP,
                        help=f"what is timed (default {DEFAULT_SETUP}: the {CACHE_MODEL} model, mostly the cache's "
                             f"own work; or one of measure/speed.py's SPEED_SETUPS)")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the verdicts here")
    return parser


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def run(args) -> int:
    import json
    from pathlib import Path

    from kvcache_repro.releases import side_by_side as sbs

    if args.setup not in sbs.setups():
        raise cli.UsageError(f"--setup {args.setup}: not one of {', '.join(sorted(sbs.setups()))}")
    try:
        found, va, vb = sbs.run(args.baseline, args.candidate, args.setup, args.rounds, args.blocks,
                                _env_pairs(args.baseline_env), _env_pairs(args.candidate_env))
    except ValueError as error:
        raise cli.UsageError(str(error)) from None
    except RuntimeError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    print(f"baseline {va}\ncandidate {vb}")
    for r in found.values():
        print(r.line())
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": va, "candidate": vb, "verdicts": {
            k: {"ratio": r.ratio, "verdict": r.verdict, "block_ratios": r.block_ratios}
            for k, r in found.items()}}, indent=2) + "\n")
    return 1 if any(r.verdict == sbs.SLOWER for r in found.values()) else 0
