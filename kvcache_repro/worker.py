"""One measurement in a fresh process: ``python -m kvcache_repro.worker SCENARIO BACKEND BATCH``.

Prints the Measurement as one JSON line prefixed with ``RESULT `` on stdout. A fresh
process per run is what makes peak RSS mean "this run" and mirrors the seed, which ran
each backend in a fresh kernel.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

RESULT_PREFIX = "RESULT "
NOTES_SEPARATOR = " | "  # between the notes of one Measurement


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("backend")
    parser.add_argument("batch", type=int)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    from . import scenarios  # torch-free: the hub setting below must precede transformers' import

    scenario = scenarios.get(args.scenario)
    if scenario.model != "checkpoint":
        # only a scenario that names a hub checkpoint may reach the hub
        os.environ["HF_HUB_OFFLINE"] = "1"
    from . import memory, quanto_unpack, threads

    threads.pin()
    notes = [quanto_unpack.install_if_requested() if memory.BACKENDS[args.backend].backend == "quanto" else None]
    model, tokenizer = memory.load_model(scenario, args.checkpoint)
    result = memory.measure(scenario, args.backend, args.batch, model, tokenizer)
    notes += getattr(model, "kvq_notes", [])  # random weights: said with every result (offline.py)
    notes = NOTES_SEPARATOR.join(n for n in [result.notes, *notes] if n)
    result = dataclasses.replace(result, notes=notes)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result.to_dict()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
