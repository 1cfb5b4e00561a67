"""the memory experiment on what this machine has, or on your model (./kvq experiment)"""
from __future__ import annotations

from kvcache_repro.backends.matrix import SEED_SETTINGS  # torch-free
from kvcache_repro.commands import library_doc
from kvcache_repro.core import cli

LIBRARY = "runner/experiment_command.py"
# --model's own options: name -> (default, help); given without --model they are an error
MODEL_OPTIONS = {
    "device": (None, "default: cuda when present, else cpu"),
    "backends": (None, "comma-separated (default none,quanto2,quanto4,hqq2,hqq4,hqq2-axis1,hqq4-axis1,fp8: those "
                       "this release builds and this model's cache can hold)"),
    "batch_sizes": (None, "comma-separated (default: CUDA 1,200 as the seed; CPU 1,8)"),
    "new_tokens": (None, "default: CUDA 1000 as the seed; CPU 64"),
    "dtype": (None, "default: CUDA fp16; CPU fp32"),
    "weights": ("native", "native (default) or nf4 (bitsandbytes, CUDA, as the seed)"),
    "q_group_size": (SEED_SETTINGS.q_group_size, f"default {SEED_SETTINGS.q_group_size} (the seed's)"),
    "residual_length": (SEED_SETTINGS.residual_length, f"default {SEED_SETTINGS.residual_length} (the seed's)"),
    "text": (None, "a UTF-8 text file for the accuracy (teacher-forced, 2 rows x 192 tokens from its start); "
                   "default: the stdlib's help topics"),
}
POSITIVE_INTS = ("new_tokens", "q_group_size", "residual_length")


def build_parser():
    from kvcache_repro.measure import scenarios  # torch-free at import: the names --help lists

    parser = cli.parser("./kvq experiment", library_doc(LIBRARY), [
        "./kvq experiment                              # the scenario this machine can run (CPU: cpu)",
        "./kvq experiment --resume                     # after an interruption: only the missing rows",
        "./kvq experiment --scenario cpu-tiny --output-dir /tmp/tiny",
        "./kvq experiment --scenario seed --checkpoint DIR   # a local copy of the seed's model (CUDA, NF4)",
        "./kvq experiment --model DIR_OR_ID            # your model: memory, accuracy, speed of every backend",
        "./kvq experiment --model DIR_OR_ID --backends none,quanto4,hqq4 --batch-sizes 1,8 --text FILE",
        "./kvq experiment --update-baselines           # record this run as the baselines"],
        "0 every verdict passed and every row was measured; 1 a verdict failed or a row was not "
        "measured (out of memory, time limit, error: the table says which); 2 bad arguments, or "
        "--resume of another setup; 3 a stale quanto build lock (the message names the fix); 128+N "
        "killed by signal N (the rows measured so far are kept). Outputs: OUTPUT_DIR/rows.json (as rows "
        "finish), results.json, results.md, memory.png")
    parser.add_argument("--scenario", choices=list(scenarios.SCENARIOS), default=None,
                        help="default: the one this machine can run (seed / gpu-small / cpu)")
    parser.add_argument("--checkpoint", default=None,
                        help="a local copy (or another hub id) of the seed's model for `--scenario seed`; a model of "
                             "another architecture is refused (use --model)")
    model = parser.add_argument_group(
        "your own model (--model): the seed's memory protocol on any causal LM, then each backend's accuracy "
        "(teacher-forced vs the unquantized cache) and decode time (vs the unquantized cache); one report "
        "(model.md, model.png, model.json); baselines in baselines/models/ keyed by model, dtype, weights, device "
        "and settings, recorded by a first run")
    model.add_argument("--model", default=None, help="a hub id or a local directory (config, weights, tokenizer)")
    choices = {"device": ("cuda", "cpu"), "dtype": tuple(scenarios.DTYPES), "weights": scenarios.WEIGHTS}
    for name, (default, text) in MODEL_OPTIONS.items():
        model.add_argument(f"--{name.replace('_', '-')}", default=default, help=text,
                           choices=choices.get(name), type=int if name in POSITIVE_INTS else None)
    parser.add_argument("--reset-tolerances", action="store_true",
                        help="with --update-baselines: write default bands even where an entry has one")
    parser.add_argument("--update-baselines", action="store_true",
                        help="rewrite the baseline entries this run measured (refused if a row failed)")
    parser.add_argument("--record-missing-baselines", action="store_true",
                        help="record only the entries with no stored value (a new scenario or metric); "
                             "stored entries are left as they are")
    parser.add_argument("--output-dir", default=None,
                        help="write rows.json (as rows finish), results.json, results.md and memory.png here "
                             "(default results/<scenario>)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows an earlier, interrupted run of the same setup left in --output-dir "
                             "and measure only the rest (failed rows are tried again)")
    parser.add_argument("--worker-timeout", type=float, default=None,
                        help="seconds one (backend, batch) worker may run (default: from the scenario, limits.py)")
    parser.add_argument("--record-timings", action="store_true",
                        help="store each row's and the run's seconds as the recorded ones "
                             "(baselines/timings/recorded.json; every run prints its own beside them)")
    parser.add_argument("--lanes", type=int, default=None,
                        help="rows measured at once, each in its own worker (default: one per core for a CPU "
                             "scenario, 1 on CUDA); exact bytes do not depend on it, the gen s column does")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU scenarios: every row in this process, as pytest does (no fresh process per row)")
    return parser


def check(args) -> None:
    """The combinations argparse cannot express (cli.UsageError names the one found)."""
    if args.reset_tolerances and not args.update_baselines:
        raise cli.UsageError("--reset-tolerances applies only with --update-baselines")
    if args.update_baselines and args.record_missing_baselines:
        raise cli.UsageError("--update-baselines already records missing entries; give one of the two")
    if args.worker_timeout is not None and not args.worker_timeout > 0:
        raise cli.UsageError("--worker-timeout: give a positive number of seconds")
    if args.lanes is not None and args.lanes < 1:
        raise cli.UsageError("--lanes: give a positive number of rows at once")
    if args.lanes not in (None, 1) and args.in_process:
        raise cli.UsageError("--in-process measures one row after another in this process: drop --lanes")
    if args.model and (args.scenario or args.checkpoint):
        raise cli.UsageError("--model runs your model as a scenario of its own: drop --scenario/--checkpoint")
    given = [f"--{name.replace('_', '-')}" for name, (default, _) in MODEL_OPTIONS.items()
             if getattr(args, name) != default]
    if given and not args.model:
        raise cli.UsageError(f"{', '.join(given)} apply with --model; the built-in scenarios have fixed settings, "
                             f"which their baseline files belong to")
    if args.text is not None:
        from pathlib import Path

        if not Path(args.text).is_file():
            raise cli.UsageError(f"--text {args.text}: no such file (give a UTF-8 text file, ~400 words or more)")
    for name in POSITIVE_INTS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise cli.UsageError(f"--{name.replace('_', '-')}: give a positive integer")


def run(args) -> int:
    check(args)
    from kvcache_repro.runner import experiment_command

    return experiment_command.command(args)


def main(argv: list[str] | None = None) -> int:
    """The ``kvq-experiment`` script of an installed suite."""
    from kvcache_repro import commands

    return commands.call("experiment", argv)
