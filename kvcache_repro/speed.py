"""Decode speed per backend, measured interleaved so that a shared machine's slow
moments hit every backend alike: none, quanto, hqq, none, quanto, hqq, ...

Ratios are medians of per-round ratios to ``none`` from the same round, with the spread
(min, max) over rounds reported beside them.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from . import caches, generation
from .matrix import BACKENDS


@dataclass(frozen=True)
class SpeedRatio:
    backend: str
    ratio: float  # median over rounds of seconds(backend) / seconds(none): > 1 is slower
    low: float
    high: float
    tokens_per_second: float  # median generated tokens/s of the backend
    rounds: int


def decode_seconds(model, ids, backend: str, settings: caches.QuantSettings, new_tokens: int) -> float:
    t0 = time.perf_counter()
    generation.generate(model, ids, BACKENDS[backend], settings, new_tokens, keep_scores=False)
    return time.perf_counter() - t0


def interleaved_ratios(model, ids: torch.Tensor, backends: list[str], settings: caches.QuantSettings,
                       new_tokens: int, rounds: int = 5) -> dict[str, SpeedRatio]:
    names = ["none"] + [b for b in backends if b != "none"]
    for name in names:  # warm-up: quanto's kernel load, allocator growth
        decode_seconds(model, ids, name, settings, min(new_tokens, 8))
    seconds = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            seconds[name].append(decode_seconds(model, ids, name, settings, new_tokens))
    tokens = ids.shape[0] * new_tokens
    out = {}
    for name in names[1:]:
        per_round = [q / n for q, n in zip(seconds[name], seconds["none"])]
        out[name] = SpeedRatio(name, statistics.median(per_round), min(per_round), max(per_round),
                               tokens / statistics.median(seconds[name]), rounds)
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


SPEED_SETUPS = {s.name: s for s in (
    SpeedSetup("tiny", "tiny", 4, 16, 96, caches.QuantSettings(q_group_size=32, residual_length=16), 5),
    SpeedSetup("real", "real", 1, 16, 32, caches.QuantSettings(q_group_size=64, residual_length=16), 3),
)}

# Band for new entries: +/- 0.5 in time ratio. On this shared 2-core machine the spread
# between rounds of one run reached ~0.3 (reported beside each ratio); a backend that
# became 50% slower or faster relative to `none` is a change worth a look.
SPEED_TOLERANCE = 0.5


def model_and_ids(setup: SpeedSetup):
    from .models import small_real_model, tiny_model

    model = tiny_model("llama") if setup.model == "tiny" else small_real_model(torch.float32)[0]
    vocab = 200 if setup.model == "tiny" else 10000
    ids = torch.randint(3, vocab, (setup.batch, setup.prompt), generator=torch.Generator().manual_seed(0))
    return model, ids


def measure(setup: SpeedSetup) -> dict[str, SpeedRatio]:
    model, ids = model_and_ids(setup)
    return interleaved_ratios(model, ids, list(setup.backends), setup.settings, setup.new_tokens, setup.rounds)


def baseline_path(setup: SpeedSetup):
    from .baselines import BASELINE_DIR

    return BASELINE_DIR / f"speed-cpu-{setup.name}.json"


def verdicts(setup: SpeedSetup, ratios: dict[str, SpeedRatio]):
    from . import baselines

    stored = baselines.load(baseline_path(setup))
    return [baselines.compare(stored, r.backend, setup.batch, "decode_time_ratio", r.ratio) for r in ratios.values()]


def update_baselines(setup: SpeedSetup, ratios: dict[str, SpeedRatio], run_failed: bool) -> list[str]:
    import datetime
    import os

    from . import baselines
    from .experiment import package_versions

    produced_by = {"versions": package_versions(),
                   "device": f"{os.cpu_count()}-core CPU", "date": datetime.date.today().isoformat(),
                   "settings": {"batch": setup.batch, "prompt": setup.prompt, "new_tokens": setup.new_tokens,
                                "q_group_size": setup.settings.q_group_size,
                                "residual_length": setup.settings.residual_length, "rounds": setup.rounds},
                   "source": "pytest --kv-update-baselines"}
    entries = [baselines.Entry(r.backend, setup.batch, "decode_time_ratio", round(r.ratio, 3), SPEED_TOLERANCE,
                               {**produced_by, "spread": [round(r.low, 3), round(r.high, 3)]})
               for r in ratios.values()]
    return baselines.update(baseline_path(setup), entries, run_failed=run_failed, scenario=f"speed-cpu-{setup.name}",
                            description="decode time of each backend / none, interleaved rounds, median")


def rows(setup: SpeedSetup, ratios: dict[str, SpeedRatio]) -> str:
    lines = [f"{'backend':>8} {'time/none':>9} {'spread':>13} {'tokens/s':>9}"]
    for r in ratios.values():
        lines.append(f"{r.backend:>8} {r.ratio:>9.2f} {f'{r.low:.2f}-{r.high:.2f}':>13} {r.tokens_per_second:>9.1f}")
    return "\n".join(lines)
