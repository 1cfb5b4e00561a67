"""Decode speed of two environments side by side: the pinned stack and a release, in one
run, on one machine, interleaved.

A stored speed band cannot be tight (the same code's ratios span 1.37-1.65 between CPU
paths of one machine: docs/bands.md), so a 5-10% regression of a quantized backend can
only be seen against the pin measured beside it. Each environment gets one long-lived
worker (``python -m kvcache_repro.releases.side_by_side worker SETUP``, its own
interpreter: a compat env, a venv) that builds the setup's model once and, on each
request, times one generate() per backend the way speed.py does (CPU time of the one
torch thread, per forward step). The controller asks them in turn - per round A then B,
the next round B then A, every backend in each - so drift of the machine falls on both.

Per backend and environment the estimate is speed.py's: the sum over steps of the
fastest round of each step; the same on disjoint blocks of rounds gives the spread.
The verdict per backend (and for ``none``, the unquantized path): ``slower`` when the
candidate/baseline ratio of every block of rounds is above 1 + MARGIN, ``faster`` when
every one is below 1 - MARGIN, else ``not distinguishable``. MARGIN is cut from runs of
two identical environments side by side; today it is wide (see MARGIN).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kvcache_repro import cli

ROOT = Path(__file__).resolve().parents[2]
SLOWER, FASTER, NOT_DISTINGUISHABLE = "slower", "faster", "not distinguishable"
# Two identical environments side by side (tiny setup, 12 rounds, 3 blocks, both workers
# on one core; 2-core dev machine, 2026-12-02): block ratios 0.834-1.073 (none), 0.921-1.073
# (quanto4), 0.769-1.044 (hqq4) over two runs - the undisturbed time of one worker drifts
# by 20% within a two-minute run. A verdict needs every block beyond 1 +/- MARGIN; so a
# change of about 20% is caught, the 5-10% a release can cost is not yet (docs/releases.md).
MARGIN = 0.25
READY = "KVQ-SIDE-READY"
CORE_ENV = "KVQ_SIDE_CORE"  # the core both workers run on (default 0; empty: no pinning)


# ---- the worker (runs in each environment) -----------------------------------------------

def worker(setup_name: str) -> int:
    """Read backend names from stdin, answer each with its step times (JSON) on stdout."""
    from kvcache_repro import faults
    from kvcache_repro.measure import speed, threads

    faults.in_worker()  # KVQ_FAULT in this environment only: the demonstration of power
    threads.pin()
    if hasattr(os, "sched_setaffinity") and os.environ.get(CORE_ENV, "0") != "":
        # Both workers on one core (they never run at once): on a VM two vCPUs can differ in
        # speed by 20% for minutes, which a comparison across cores would read as the code.
        os.sched_setaffinity(0, {int(os.environ.get(CORE_ENV, "0"))})
    setup = speed.SPEED_SETUPS[setup_name]
    model, ids = speed.model_and_ids(setup)
    import torch

    versions = {"torch": torch.__version__}
    for name in ("transformers", "optimum-quanto", "hqq"):
        from importlib.metadata import version

        versions[name] = version(name)
    with speed.one_thread():
        for backend in ("none", *setup.backends):  # warm-up: kernel loads, first-call allocations
            speed.step_times(model, ids, backend, setup.settings, min(setup.new_tokens, 8))
        print(READY + " " + json.dumps(versions), flush=True)
        for line in sys.stdin:
            backend = line.strip()
            if not backend:
                break
            steps = speed.step_times(model, ids, backend, setup.settings, setup.new_tokens)
            print(json.dumps(steps), flush=True)
    return 0


class Worker:
    def __init__(self, python: str, setup: str, env: dict[str, str], label: str):
        self.label = label
        self.proc = subprocess.Popen([python, "-m", "kvcache_repro.releases.side_by_side", "worker", setup],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        if not line.startswith(READY):
            self.proc.kill()
            raise RuntimeError(f"{label} ({python}): the worker did not start (exit {self.proc.wait()})")
        self.versions = json.loads(line[len(READY):])

    def steps(self, backend: str) -> list[int]:
        self.proc.stdin.write(backend + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: the worker stopped (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


# ---- the comparison --------------------------------------------------------------------

@dataclass(frozen=True)
class SideBySide:
    backend: str
    ratio: float  # candidate / baseline decode CPU time, all rounds
    block_ratios: tuple[float, ...]  # the same ratio per block of rounds (pairs measured in the same minutes)
    verdict: str

    def line(self) -> str:
        return (f"{self.backend:>8}: candidate / baseline decode time {self.ratio:.3f} (blocks "
                f"{min(self.block_ratios):.3f}..{max(self.block_ratios):.3f}, margin {MARGIN:g}): {self.verdict}")


def _undisturbed(rounds: list[list[int]]) -> int:
    return sum(min(step) for step in zip(*rounds, strict=True))


def verdict(block_ratios, margin: float = MARGIN) -> str:
    """Every block's candidate/baseline ratio beyond 1 +/- margin, on the same side."""
    if min(block_ratios) > 1 + margin:
        return SLOWER
    if max(block_ratios) < 1 - margin:
        return FASTER
    return NOT_DISTINGUISHABLE


def compare(baseline: dict[str, list[list[int]]], candidate: dict[str, list[list[int]]], blocks: int,
            margin: float = MARGIN) -> dict[str, SideBySide]:
    """Per backend: the ratio of the undisturbed decode times, over all rounds and per
    block of rounds (a block's two estimates come from the same minutes of the machine)."""
    out = {}
    for backend, a_rounds in baseline.items():
        b_rounds = candidate[backend]
        size = len(a_rounds) // blocks
        chunks = [slice(i * size, (i + 1) * size) for i in range(blocks)]
        ratios = tuple(_undisturbed(b_rounds[c]) / _undisturbed(a_rounds[c]) for c in chunks)
        out[backend] = SideBySide(backend, _undisturbed(b_rounds) / _undisturbed(a_rounds), ratios,
                                  verdict(ratios, margin))
    return out


def run(baseline_python: str, candidate_python: str, setup: str = "tiny", rounds: int = 12, blocks: int = 3,
        baseline_env: dict | None = None, candidate_env: dict | None = None, log=print) -> tuple[dict, dict, dict]:
    """(verdicts per backend, baseline versions, candidate versions)."""
    from kvcache_repro.measure import speed

    if rounds < 2 * blocks:
        raise ValueError(f"rounds ({rounds}) must be at least 2 x blocks ({blocks})")
    backends = ("none", *speed.SPEED_SETUPS[setup].backends)
    a = Worker(baseline_python, setup, baseline_env or {}, "baseline")
    try:
        b = Worker(candidate_python, setup, candidate_env or {}, "candidate")
    except BaseException:
        a.close()
        raise
    times = {"baseline": {k: [] for k in backends}, "candidate": {k: [] for k in backends}}
    try:
        for r in range(rounds):
            order = ((a, "baseline"), (b, "candidate")) if r % 2 == 0 else ((b, "candidate"), (a, "baseline"))
            for backend in backends:
                for w, label in order:
                    times[label][backend].append(w.steps(backend))
            log(f"  round {r + 1}/{rounds} done")
    finally:
        a.close()
        b.close()
    return compare(times["baseline"], times["candidate"], blocks), a.versions, b.versions


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1])
    parser = cli.parser("python -m kvcache_repro.releases.side_by_side", __doc__, [
        "python -m kvcache_repro.releases.side_by_side --baseline .venv/bin/python --candidate ENV/bin/python",
        "python -m kvcache_repro.releases.side_by_side --baseline P --candidate P --candidate-env KVQ_FAULT=dequantize_half_again"],
        "0 no backend is slower in the candidate; 1 one is (or a worker failed); 2 bad arguments")
    parser.add_argument("--baseline", default=sys.executable, help="the pinned environment's python (default: this one)")
    parser.add_argument("--candidate", required=True, help="the other environment's python")
    parser.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--candidate-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--setup", default="tiny", help="a speed setup of measure/speed.py (default tiny)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the verdicts here")
    args = parser.parse_args(argv)
    try:
        found, va, vb = run(args.baseline, args.candidate, args.setup, args.rounds, args.blocks,
                            _env_pairs(args.baseline_env), _env_pairs(args.candidate_env))
    except ValueError as error:
        parser.error(str(error))
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
    return 1 if any(r.verdict == SLOWER for r in found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
