"""Decode speed per backend, measured so that other processes cannot flip a verdict (on a
2-core VM a busy neighbour moved the wall time of identical 0.5 s runs by +/-40%):

- CPU time of the measuring thread (``time.thread_time_ns``), torch pinned to one thread:
  waiting for a core is not counted, nor any OpenMP worker's spinning.
- Per step: a hook times each forward call of ``generate`` (prefill, then one per new
  token). Rounds are interleaved (none, quanto, hqq, none, ...) and a backend's time is the
  SUM OVER STEPS OF THE MINIMUM OVER ROUNDS: interference only adds time, and a burst spoils
  a few steps of a round, not a whole round.
- The same estimate on disjoint blocks of rounds gives the spread: a verdict needs the same
  answer in every block (``compare``), else it is "not distinguishable on this setup".

generate()'s own Python between forward calls is the same for every backend and is left
out: the quantity is the model's forward, where all of the cache's work happens.
"""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvcache_repro.backends import caches, generation
from kvcache_repro.backends.matrix import BACKENDS

# Verdicts of ``compare``: the words the claims table prints.
SLOWER, FASTER, NOT_DISTINGUISHABLE = "slower", "faster", "not distinguishable"


@dataclass(frozen=True)
class SpeedRatio:
    backend: str
    ratio: float  # decode CPU time of the backend / of none, all rounds: > 1 is slower
    blocks: tuple[float, ...]  # the same ratio from each disjoint block of rounds
    tokens_per_second: float  # generated tokens per second of forward (CPU time or CUDA events), all rounds
    rounds: int
    # The same ratio over the decode steps where the backend does not re-quantize: what every
    # step pays (dequantize, concatenation), without hqq's optimizer at a flush, whose cost
    # moves most between CPU paths. The quantity of the loose speed bound (docs/bands.md).
    between_flushes: float = 0.0

    @property
    def low(self) -> float:
        return min(self.blocks)

    @property
    def high(self) -> float:
        return max(self.blocks)


def paired(a: SpeedRatio, b: SpeedRatio | None = None) -> tuple[float, ...]:
    """``a``'s time over ``b``'s (over none's when b is None) in each block: both were
    measured in the same interleaved rounds, so none's time in the block cancels."""
    if b is None:
        return a.blocks
    if len(a.blocks) != len(b.blocks):
        raise ValueError(f"{a.backend} has {len(a.blocks)} blocks, {b.backend} {len(b.blocks)}: not the same rounds")
    return tuple(x / y for x, y in zip(a.blocks, b.blocks))


def compare(a: SpeedRatio, b: SpeedRatio | None = None) -> str:
    """Is ``a`` slower than ``b`` (or than none) in every block of rounds, block by block
    (``paired``)? Blocks of different rounds would each carry their own none as noise."""
    ratios = paired(a, b)
    if min(ratios) > 1.0:
        return SLOWER
    if max(ratios) < 1.0:
        return FASTER
    return NOT_DISTINGUISHABLE


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def step_times(model, ids, backend: str, settings: caches.QuantSettings, new_tokens: int) -> list[int]:
    """The nanoseconds of each forward call of ``model`` in one generate(): CPU time of this
    thread on a CPU; on a GPU, CUDA events around each call (the device's time, read once
    generate() is done: no synchronization between steps)."""
    if ids.device.type == "cuda":
        return _cuda_step_times(model, ids, backend, settings, new_tokens)
    steps: list[int] = []

    def post(*_):
        steps[-1] += time.thread_time_ns()
    hooks = (model.register_forward_pre_hook(lambda *_: steps.append(-time.thread_time_ns())),
             model.register_forward_hook(post))
    try:
        generation.generate(model, ids, BACKENDS[backend], settings, new_tokens, keep_scores=False)
    finally:
        for hook in hooks:
            hook.remove()
    return steps


def _cuda_step_times(model, ids, backend: str, settings: caches.QuantSettings, new_tokens: int) -> list[int]:
    events: list[tuple] = []

    def mark(i: int):
        def hook(*_):
            if i == 0:
                events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][i].record()
        return hook
    hooks = (model.register_forward_pre_hook(mark(0)), model.register_forward_hook(mark(1)))
    try:
        generation.generate(model, ids, BACKENDS[backend], settings, new_tokens, keep_scores=False)
    finally:
        for hook in hooks:
            hook.remove()
    torch.cuda.synchronize(ids.device)
    return [int(start.elapsed_time(end) * 1e6) for start, end in events]


def undisturbed_ns(rounds: list[list[int]]) -> int:
    """Sum over steps of the fastest round of each step."""
    return sum(min(step) for step in zip(*rounds, strict=True))


def decided(ratios: dict[str, SpeedRatio]) -> bool:
    """Every backend apart from none, and every two backends apart from each other."""
    items = list(ratios.values())
    return (all(compare(r) != NOT_DISTINGUISHABLE for r in items)
            and all(compare(a, b) != NOT_DISTINGUISHABLE for i, a in enumerate(items) for b in items[i + 1:]))


def interleaved_ratios(model, ids: torch.Tensor, backends: list[str], settings: caches.QuantSettings,
                       new_tokens: int, rounds: int = 6, blocks: int = 2, max_rounds: int | None = None
                       ) -> dict[str, SpeedRatio]:
    """``rounds`` interleaved rounds; while some comparison is inside the spread, another
    ``rounds`` more, up to ``max_rounds``: a noisy machine costs time, not a verdict."""
    if rounds < 2 * blocks:
        raise ValueError(f"rounds ({rounds}) must be at least 2 x blocks ({blocks}): "
                         "a block of one round has no minimum to take")
    names = ["none"] + [b for b in backends if b != "none"]
    per_round: dict[str, list[list[int]]] = {name: [] for name in names}
    with one_thread():
        for name in names:  # warm-up: quanto's kernel load, first-call allocations
            step_times(model, ids, name, settings, min(new_tokens, 8))
        while True:
            for _ in range(rounds):
                for name in names:
                    per_round[name].append(step_times(model, ids, name, settings, new_tokens))
            out = _ratios(per_round, names, blocks, ids.shape[0] * new_tokens,
                          _quiet_steps(model, names, settings, ids.shape[1], new_tokens))
            if decided(out) or len(per_round["none"]) + rounds > (max_rounds or rounds):
                return out


def _quiet_steps(model, names, settings: caches.QuantSettings, prompt: int, new_tokens: int) -> dict[str, list[int]]:
    """Per backend, the indices of generate()'s forward calls (0: the prefill) that decode
    one token without re-quantizing: sequence length prompt + i is not a flush length."""
    out = {}
    for name in names[1:]:
        spec = BACKENDS[name]
        flushes = set(caches.flush_lengths(spec, model.config, settings, prompt, prompt + new_tokens, 1)
                      if spec.group_wise else ())
        out[name] = [i for i in range(1, new_tokens) if prompt + i not in flushes]
    return out


def _ratios(per_round, names, blocks: int, tokens: int, quiet: dict[str, list[int]]) -> dict[str, SpeedRatio]:
    done = len(per_round["none"])
    chunks = [slice(i * (done // blocks), (i + 1) * (done // blocks)) for i in range(blocks)]
    none, out = per_round["none"], {}
    for name in names[1:]:
        total = undisturbed_ns(per_round[name])
        per_block = tuple(undisturbed_ns(per_round[name][c]) / undisturbed_ns(none[c]) for c in chunks)
        steps = quiet[name]
        between = (undisturbed_ns([[r[i] for i in steps] for r in per_round[name]])
                   / undisturbed_ns([[r[i] for i in steps] for r in none])) if steps else math.nan
        out[name] = SpeedRatio(name, total / undisturbed_ns(none), per_block, tokens / (total / 1e9), done, between)
    return out


# ---- setups, baselines -----------------------------------------------------------------

@dataclass(frozen=True)
class SpeedSetup:
    name: str
    model: str  # "tiny" or "real"
    batch: int
    prompt: int
    new_tokens: int
    settings: caches.QuantSettings
    rounds: int
    backends: tuple[str, ...] = ("quanto4", "hqq4")
    blocks: int = 2
    max_rounds: int = 0  # extra rounds, in steps of ``rounds``, while a comparison is undecided
    slow: bool = False  # its tests are marked slow (run with --kv-run-slow)
    device: str = "cpu"  # cuda: CUDA events time each forward (step_times)

    def describe(self) -> str:
        return (f"{self.model} model, batch {self.batch}, {self.prompt}-token prompt + {self.new_tokens} new, "
                f"G {self.settings.q_group_size}, R {self.settings.residual_length}, {self.rounds} rounds"
                f"{f' (up to {self.max_rounds} while undecided)' if self.max_rounds > self.rounds else ''}, "
                + ("CUDA events" if self.device == "cuda" else "1 thread, CPU time"))


SEED_SETTINGS = caches.SEED_SETTINGS
SPEED_SETUPS = {s.name: s for s in (
    # The tiny Llama, 256 new tokens = 4 flushes: the cache's work is a large share of each
    # step. Under load one run of 6 rounds had blocks 1.40-1.68 (quanto4), 1.66-2.05 (hqq4).
    SpeedSetup("tiny", "tiny", 16, 16, 256, SEED_SETTINGS, 6, max_rounds=18),
    SpeedSetup("real", "real", 1, 16, 160, SEED_SETTINGS, 6, slow=True),  # 160 new tokens = 2 flushes
)}


def band(ratio: SpeedRatio) -> float:
    """Tolerance stored with a new entry: a share of the overhead the cache costs (what a
    regression in a cache changes), never below the ratio's run-to-run repeatability."""
    return round(max(OVERHEAD_SHARE * abs(ratio.ratio - 1), REPEATABILITY), 3)


# Ten runs of the tiny setup strayed up to 0.135 from their median: bands are at least 1.5x that.
REPEATABILITY = 0.2
# Fault ``double_dequantize`` raised quanto4's ratio by 0.30 and hqq4's by 0.19 there.
OVERHEAD_SHARE = 0.35


def model_and_ids(setup: SpeedSetup):
    from kvcache_repro.backends.models import small_real_model, tiny_model

    model = tiny_model("llama") if setup.model == "tiny" else small_real_model(torch.float32)[0]
    vocab = 200 if setup.model == "tiny" else 10000
    ids = torch.randint(3, vocab, (setup.batch, setup.prompt), generator=torch.Generator().manual_seed(0))
    return model, ids


def measure(setup: SpeedSetup) -> dict[str, SpeedRatio]:
    model, ids = model_and_ids(setup)
    return interleaved_ratios(model, ids, list(setup.backends), setup.settings, setup.new_tokens,
                              setup.rounds, setup.blocks, setup.max_rounds or setup.rounds)


def measure_in_fresh_process(setup: SpeedSetup, timeout: float = 1800) -> dict[str, SpeedRatio]:
    """``measure`` in a new Python process: what earlier tests leave in a long session's
    process (its heap, loaded models) moved hqq4 from 1.70 of none to 2.08."""
    proc = subprocess.run([sys.executable, "-m", "kvcache_repro.measure.speed", setup.name],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[2])
    if proc.returncode != 0:
        raise RuntimeError(f"speed measurement of {setup.name!r} failed in its process (exit {proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith(RESULT_PREFIX))
    return ratios_from_json(json.loads(line[len(RESULT_PREFIX):]))


def ratios_to_json(ratios: dict[str, SpeedRatio]) -> dict:
    return {name: asdict(r) for name, r in ratios.items()}


def ratios_from_json(data: dict) -> dict[str, SpeedRatio]:
    return {name: SpeedRatio(**{**fields, "blocks": tuple(fields["blocks"])}) for name, fields in data.items()}


RESULT_PREFIX = "KVQ-SPEED "


def rows(setup: SpeedSetup, ratios: dict[str, SpeedRatio]) -> str:
    lines = [f"{'backend':>8} {'time/none':>9} {'blocks':>13} {'vs none':>20} {'tokens/CPU s':>12}"]
    for r in ratios.values():
        lines.append(f"{r.backend:>8} {r.ratio:>9.3f} {f'{r.low:.3f}-{r.high:.3f}':>13} {compare(r):>20} "
                     f"{r.tokens_per_second:>12.1f}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m kvcache_repro.measure.speed SETUP: one measurement, JSON on the last line
    from kvcache_repro import faults
    from kvcache_repro.measure import threads

    threads.pin()
    faults.in_worker()  # KVQ_FAULT, as the test process has it: the speed faults act here
    print(RESULT_PREFIX + json.dumps(ratios_to_json(measure(SPEED_SETUPS[sys.argv[1]]))), flush=True)
