"""Every metric the suite stores, as one table: what its value is, how a move above or below
its band reads, its default band, whether it is exact on CPU, where it applies. Baselines,
bands, the experiment and the reports read it here; a new metric is a row."""
from __future__ import annotations

from dataclasses import dataclass

MEMORY, ACCURACY, SPEED = "memory", "accuracy", "speed"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # MEMORY, ACCURACY or SPEED
    unit: str  # what a stored value is ("ratio" for a ratio to the unquantized run)
    above: str  # how a value above its band reads
    below: str
    # The band written with a new entry (memory; accuracy and speed bands come from
    # bands.floor and the spread between machines). cache_bytes is exact (two analytic byte
    # counts), and so is peak_allocated on CPU (peak.py: identical bytes in repeated runs and
    # at 1 or 2 threads): 0.1% there is room for the stored ratio's rounding, not for noise.
    # On CUDA the peaks carry the allocator's block rounding and kernel choices.
    tolerance: float | None = None
    exact_on_cpu: bool = False  # exact bytes on CPU: the same on every path (peak.py)
    reference: bool = False  # the unquantized run's own value, not a ratio to it
    higher_is_better: bool = False
    large_batch_only: bool = False  # compared at a scenario's large batch only


_MORE, _LESS = "uses more memory", "uses less memory"
_WORSE, _BETTER = "is less accurate", "is more accurate"

METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("peak_reserved", MEMORY, "ratio", _MORE, _LESS, 0.05),
    Metric("peak_allocated", MEMORY, "ratio", _MORE, _LESS, 0.05, exact_on_cpu=True),
    Metric("reserved_after", MEMORY, "ratio", _MORE, _LESS, 0.05),
    Metric("peak_rss_growth", MEMORY, "ratio", _MORE, _LESS, 0.15, large_batch_only=True),
    Metric("cache_bytes", MEMORY, "ratio", _MORE, _LESS, 0.001, exact_on_cpu=True),
    # The unquantized reference itself: every ratio divides by none's peak, so a regression
    # of the plain cache or of the model (both sides alike) moves no ratio the way it moves
    # the claims. None's peak allocated in MiB (exact bytes on CPU, to 4 decimals: 105
    # bytes); 5% off CPU for an allocator's rounding.
    Metric("reference_peak_mib", MEMORY, "MiB (none's peak)", _MORE, _LESS, 0.05, exact_on_cpu=True,
           reference=True),
    Metric("kl", ACCURACY, "nats/token", _WORSE, _BETTER),
    Metric("top1_agreement", ACCURACY, "share", _BETTER, _WORSE, higher_is_better=True),
    Metric("perplexity_ratio", ACCURACY, "ratio", _WORSE, _BETTER),
    Metric("reference_perplexity", ACCURACY, "perplexity (the unquantized model's)",
           "predicts the text worse (the model itself, every cache alike)",
           "predicts the text better (the model itself changed)", reference=True),
    Metric("decode_time_ratio", SPEED, "ratio", "is slower", "is faster"),
)}


def of_kind(kind: str) -> tuple[str, ...]:
    return tuple(name for name, m in METRICS.items() if m.kind == kind)


EXACT_ON_CPU = frozenset(name for name, m in METRICS.items() if m.exact_on_cpu)
REFERENCE_METRICS = frozenset(name for name, m in METRICS.items() if m.reference)
LARGE_BATCH_ONLY = frozenset(name for name, m in METRICS.items() if m.large_batch_only)
HIGHER_IS_BETTER = frozenset(name for name, m in METRICS.items() if m.higher_is_better)


def default_tolerance(device: str, metric: str) -> float:
    """The band a new memory entry is written with: an exact quantity's rounding on CPU."""
    if device == "cpu" and METRICS[metric].exact_on_cpu:
        return METRICS["cache_bytes"].tolerance
    return METRICS[metric].tolerance
