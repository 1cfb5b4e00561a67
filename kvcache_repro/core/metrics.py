"""Every metric the suite stores, as one table (a new metric is a row): what its value is, how
a move above or below its band reads, its default band, whether it is exact on CPU."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str  # what a stored value is ("ratio" for a ratio to the unquantized run)
    above: str  # how a value above its band reads
    below: str
    # The band of a new memory entry (accuracy and speed: bands.floor and the spread between
    # machines). Exact bytes on CPU (peak.py): 0.1% for the stored ratio's rounding, not noise.
    tolerance: float | None = None
    exact_on_cpu: bool = False  # exact bytes on CPU: the same on every path (peak.py)
    reference: bool = False  # the unquantized run's own value, not a ratio to it
    higher_is_better: bool = False
    large_batch_only: bool = False  # compared at a scenario's large batch only
    # depends on the CUDA caching allocator's configuration: compared only with a baseline
    # taken under the same one (measure/reserved.py)
    allocator_dependent: bool = False


_MORE, _LESS = "uses more memory", "uses less memory"
_WORSE, _BETTER = "is less accurate", "is more accurate"

METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("peak_reserved", "ratio", _MORE, _LESS, 0.05, allocator_dependent=True),
    Metric("peak_allocated", "ratio", _MORE, _LESS, 0.05, exact_on_cpu=True),
    # the largest live bytes in a decode step that does not re-quantize (measure/memory.py
    # StepPeaks): a decode step's own transient, which the flush's peak hides in peak_allocated
    Metric("decode_step_peak", "ratio", _MORE, _LESS, 0.05, exact_on_cpu=True),
    Metric("reserved_after", "ratio", _MORE, _LESS, 0.05, allocator_dependent=True),
    Metric("peak_rss_growth", "ratio", _MORE, _LESS, 0.15, large_batch_only=True),
    Metric("cache_bytes", "ratio", _MORE, _LESS, 0.001, exact_on_cpu=True),
    # The unquantized reference itself (a regression of the plain cache or the model moves no
    # ratio): none's peak in MiB, to 4 decimals (105 bytes); 5% off CPU, an allocator's rounding.
    Metric("reference_peak_mib", "MiB (none's peak)", _MORE, _LESS, 0.05, exact_on_cpu=True, reference=True),
    Metric("kl", "nats/token", _WORSE, _BETTER),
    Metric("top1_agreement", "share", _BETTER, _WORSE, higher_is_better=True),
    Metric("perplexity_ratio", "ratio", _WORSE, _BETTER),
    # the tiny accuracy setups (measure/quality.py logit_error): positions before / past 512 quantized tokens
    Metric("logit_error", "relative RMS", _WORSE, _BETTER),
    Metric("logit_error_past_512", "relative RMS", _WORSE, _BETTER),
    Metric("reference_perplexity", "perplexity (the unquantized model's)",
           "predicts the text worse (the model itself, every cache alike)",
           "predicts the text better (the model itself changed)", reference=True),
    Metric("decode_time_ratio", "ratio", "is slower", "is faster"),
    # The decode steps that do not re-quantize (measure/speed.py SpeedRatio.between_flushes):
    # held under a loose ceiling cut from its spread (verdicts/speed.py ceilings), not banded.
    Metric("between_flushes_time_ratio", "ratio", "is slower", "is faster"),
)}

EXACT_ON_CPU = frozenset(name for name, m in METRICS.items() if m.exact_on_cpu)
REFERENCE_METRICS = frozenset(name for name, m in METRICS.items() if m.reference)
LARGE_BATCH_ONLY = frozenset(name for name, m in METRICS.items() if m.large_batch_only)
ALLOCATOR_DEPENDENT = frozenset(name for name, m in METRICS.items() if m.allocator_dependent)
HIGHER_IS_BETTER = frozenset(name for name, m in METRICS.items() if m.higher_is_better)


def default_tolerance(device: str, metric: str) -> float:
    """The band a new memory entry is written with: an exact quantity's rounding on CPU."""
    if device == "cpu" and METRICS[metric].exact_on_cpu:
        return METRICS["cache_bytes"].tolerance
    return METRICS[metric].tolerance
