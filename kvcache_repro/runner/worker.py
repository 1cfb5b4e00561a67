"""One measurement in a fresh process: ``python -m kvcache_repro.runner.worker SCENARIO BACKEND BATCH``.

Prints the Measurement as one JSON line prefixed with ``RESULT `` on stdout. A fresh
process per run is what makes peak RSS mean "this run" and mirrors the seed, which ran
each backend in a fresh kernel.

Out of memory is an outcome, not a crash: the worker prints a ``FAILED `` line (a
RowFailure: "OOM at batch N on this device, X GiB free") and exits with OOM_EXIT.
Progress goes to stderr line by line, so the parent can show a hung worker's last words.
SIGTERM (what the parent sends first at its time limit or on Ctrl-C) raises
KeyboardInterrupt here, so ``finally`` blocks run - among them torch's release of
quanto's build lock, were the worker building the extension at that moment.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys

RESULT_PREFIX = "RESULT "
FAILED_PREFIX = "FAILED "
OOM_EXIT = 3
STALE_LOCK_EXIT = 4
NOTES_SEPARATOR = " | "  # between the notes of one Measurement


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def say(line: str) -> None:
    print(f"worker {os.getpid()}: {line}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("backend")
    parser.add_argument("batch", type=int)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    from kvcache_repro import faults
    from kvcache_repro.measure import scenarios  # torch-free: the hub setting below must precede transformers' import

    scenario = scenarios.get(args.scenario)
    if scenario.model != "checkpoint":
        # only a scenario that names a hub checkpoint may reach the hub
        os.environ["HF_HUB_OFFLINE"] = "1"
    say(f"{scenario.name} {args.backend} b{args.batch}: starting")
    faults.in_worker()  # KVQ_FAULT, as the test process has it
    from kvcache_repro.measure import memory, threads
    from kvcache_repro.backends import quanto_ext

    threads.pin()
    try:
        notes = [memory.BACKENDS[args.backend].kind.prepare(say)]  # quanto: its extension, maybe its Python unpack
    except quanto_ext.StaleLockError as error:
        print(str(error), file=sys.stderr, flush=True)
        return STALE_LOCK_EXIT
    say("loading the model")
    model, tokenizer = memory.load_model(scenario, args.checkpoint)
    say(f"generating {scenario.new_tokens} new tokens")
    import torch

    try:
        result = memory.measure(scenario, args.backend, args.batch, model, tokenizer)
    except torch.OutOfMemoryError as error:
        from kvcache_repro.runner.outcomes import oom

        failure = oom(scenario.name, args.backend, args.batch, scenario.device, error)
        say(failure.message)
        sys.stdout.write(FAILED_PREFIX + json.dumps(failure.to_dict()) + "\n")
        return OOM_EXIT
    notes += getattr(model, "kvq_notes", [])  # random weights: said with every result (offline.py)
    if scenario.device == "cuda" and "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").lower():
        from kvcache_repro.measure.reserved import EXPANDABLE_NOTE

        notes.append(EXPANDABLE_NOTE)  # reserved memory of another allocator mode: said with the result
    notes = NOTES_SEPARATOR.join(n for n in [result.notes, *notes] if n)
    result = dataclasses.replace(result, notes=notes)
    say(f"done: generate {result.generate_seconds:.1f} s")
    sys.stdout.write(RESULT_PREFIX + json.dumps(result.to_dict()) + "\n")
    return 0


def _where(error: BaseException) -> str:
    """The line the worker was running when the signal came (not the handler's own)."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.name != "_terminate"]
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stopped:  # one line saying where, not a traceback that hides the log
        say(f"stopped ({stopped}) at {_where(stopped)}")
        sys.exit(130)
