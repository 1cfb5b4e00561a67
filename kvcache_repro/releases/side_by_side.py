"""Decode speed of two environments side by side: the pinned stack and a release, in one
run, on one machine, interleaved (``./kvq side-by-side``, and ``./kvq compat`` per spec).

A stored speed band cannot be tight (docs/bands.md), so a release's decode time is judged
against the pin's measured beside it: per block of rounds each environment gets a fresh
worker (``worker``, in its own interpreter) that times one generate() per backend per
request, asked in turn (A B, then B A), so drift of the machine falls on both
(docs/releases.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SLOWER, FASTER, NOT_DISTINGUISHABLE = "slower", "faster", "not distinguishable"
# Two identical environments side by side (the cache setup, 16 rounds in 4 blocks, one
# core): all-rounds ratios within 0.951-1.048 in six runs, single blocks 0.859-1.145; a 1.5x
# dequantize read quanto4 1.19 and hqq4 1.12-1.25. Twice the widest identical deviation.
MARGIN = 0.10
READY = "KVQ-SIDE-READY"
CORE_ENV = "KVQ_SIDE_CORE"  # the core both workers run on (default 0; empty: no pinning)
CACHE_MODEL = "wide-kv"
PACKAGES = ("transformers", "optimum-quanto", "hqq")  # read in each worker, with torch
DEFAULT_SETUP = "cache"


def setups() -> dict:
    """speed.py's setups and ``cache``: a decode that is mostly the quantized cache's own
    work. A 448-token prompt is quantized once and dequantized in full at each of the 31
    decode steps (no flush: 32 new tokens < R 64), on a model wide in K/V (4 KV heads x 64)
    and shallow (2 layers): the cache is about 45% (quanto4) and 30% (hqq4) of the decode
    time, where the tiny setup's dequantize was about 15%."""
    from kvcache_repro.backends import caches
    from kvcache_repro.measure import speed

    settings = caches.SEED_SETTINGS
    return {**speed.SPEED_SETUPS, "cache": speed.SpeedSetup("cache", CACHE_MODEL, 8, 448, 32, settings, 12)}


def model_and_ids(setup):
    """speed.py's model for its setups; the ``wide-kv`` Llama for ``cache`` (seeded,
    random, built from its config: nothing to download)."""
    from kvcache_repro.measure import speed

    if setup.model != CACHE_MODEL:
        return speed.model_and_ids(setup)
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                                      max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 256, (setup.batch, setup.prompt), generator=torch.Generator().manual_seed(0))
    return model, ids


def worker(setup_name: str) -> int:
    """Read backend names from stdin, answer each with its step times (JSON) on stdout."""
    from importlib.metadata import version

    import torch

    from kvcache_repro import faults
    from kvcache_repro.measure import speed, threads

    faults.in_worker()  # KVQ_FAULT in this environment only: the demonstration of power
    threads.pin()
    if hasattr(os, "sched_setaffinity") and os.environ.get(CORE_ENV, "0") != "":
        # Both workers on one core (they never run at once): on a VM two vCPUs can differ in
        # speed by 20% for minutes, which a comparison across cores would read as the code.
        os.sched_setaffinity(0, {int(os.environ.get(CORE_ENV, "0"))})
    setup = setups()[setup_name]
    model, ids = model_and_ids(setup)
    versions = {"torch": torch.__version__, **{p: version(p) for p in PACKAGES}}
    with speed.one_thread():
        for backend in ("none", *setup.backends):  # warm-up: kernel loads, first-call allocations
            speed.step_times(model, ids, backend, setup.settings, min(setup.new_tokens, 8))
        print(READY + " " + json.dumps(versions), flush=True)
        for line in sys.stdin:
            if not (backend := line.strip()):
                break
            steps = speed.step_times(model, ids, backend, setup.settings, setup.new_tokens)
            print(json.dumps(steps[1:]), flush=True)  # decode steps only, not the prefill's quantize
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
        if not (line := self.proc.stdout.readline()):
            raise RuntimeError(f"{self.label}: the worker stopped (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


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
    """speed.py's estimate: the sum over steps of each step's fastest round."""
    return sum(min(step) for step in zip(*rounds, strict=True))


def verdict(ratio: float, block_ratios, margin: float = MARGIN) -> str:
    """The all-rounds ratio beyond 1 +/- margin, and all but one block on that side of 1 (one
    pair of processes far off cannot make a verdict alone)."""
    need = len(block_ratios) - 1
    if ratio > 1 + margin and sum(r > 1 for r in block_ratios) >= need:
        return SLOWER
    if ratio < 1 - margin and sum(r < 1 for r in block_ratios) >= need:
        return FASTER
    return NOT_DISTINGUISHABLE


def compare(baseline: dict[str, list[list[int]]], candidate: dict[str, list[list[int]]], blocks: int,
            margin: float = MARGIN) -> dict[str, SideBySide]:
    """Per backend: the ratio of the undisturbed decode times, over all rounds and per
    block of rounds (a block's two estimates come from the same minutes of the machine)."""
    out = {}
    for backend, a_rounds in baseline.items():
        b_rounds, size = candidate[backend], len(a_rounds) // blocks
        chunks = [slice(i * size, (i + 1) * size) for i in range(blocks)]
        ratios = tuple(_undisturbed(b_rounds[c]) / _undisturbed(a_rounds[c]) for c in chunks)
        ratio = _undisturbed(b_rounds) / _undisturbed(a_rounds)
        out[backend] = SideBySide(backend, ratio, ratios, verdict(ratio, ratios, margin))
    return out


# glibc hands large freed blocks back to the kernel and page-faults them in again on the
# next step (on this VM 6x the minor faults, seconds of system time in the thread's CPU
# time); kept in the heap instead (32 MiB: glibc's largest mmap threshold).
QUIET_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
                "MALLOC_TOP_PAD_": str(256 << 20)}


def run(baseline_python: str, candidate_python: str, setup: str = DEFAULT_SETUP, rounds: int = 16, blocks: int = 4,
        baseline_env: dict | None = None, candidate_env: dict | None = None, log=print) -> tuple[dict, dict, dict]:
    """(verdicts per backend, baseline versions, candidate versions). Each block has fresh
    workers: a process's own speed (its heap, where its pages landed) differed between two
    identical environments by up to 6% for a whole run, which interleaving cannot cancel."""
    if rounds < 2 * blocks:
        raise ValueError(f"rounds ({rounds}) must be at least 2 x blocks ({blocks})")
    backends = ("none", *setups()[setup].backends)
    times = {"baseline": {k: [] for k in backends}, "candidate": {k: [] for k in backends}}
    envs = (("baseline", baseline_python, baseline_env), ("candidate", candidate_python, candidate_env))
    versions, per_block = {}, rounds // blocks
    for block in range(blocks):
        workers = {}
        try:
            for label, python, env in envs if block % 2 == 0 else envs[::-1]:
                workers[label] = Worker(python, setup, {**QUIET_MALLOC, **(env or {})}, label)
                versions[label] = workers[label].versions
            for r in range(per_block):
                order = ("baseline", "candidate") if r % 2 == 0 else ("candidate", "baseline")
                for backend in backends:
                    for label in order:
                        times[label][backend].append(workers[label].steps(backend))
        finally:
            for w in workers.values():
                w.close()
        log(f"  block {block + 1}/{blocks} done ({per_block} rounds, fresh workers)")
    if os.environ.get("KVQ_SIDE_TIMES"):
        Path(os.environ["KVQ_SIDE_TIMES"]).write_text(json.dumps(times))
    return compare(times["baseline"], times["candidate"], blocks), versions["baseline"], versions["candidate"]


if __name__ == "__main__":  # the worker, in each environment compared: python -m ... worker SETUP
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 3:
        sys.exit("usage: python -m kvcache_repro.releases.side_by_side worker SETUP (the comparison itself: "
                 "./kvq side-by-side, python -m kvcache_repro side-by-side)")
    sys.exit(worker(sys.argv[2]))
