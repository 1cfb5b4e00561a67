"""The seed's memory experiment, per scenario (those scenarios.toml tags "experiment"): each
(backend, batch) generates in a fresh subprocess; cache bytes, peaks and ratios to the
unquantized run are checked against the analytic model and the stored baselines. On GPU,
``pytest -m gpu -n <gpus>`` gives each xdist worker its own device (CUDA_VISIBLE_DEVICES).
"""
from __future__ import annotations

import pytest

from kvcache_repro.measure import scenarios
from kvcache_repro.verdicts import comparison
from kvcache_repro.runner import experiment

# The default tier, then the dry runs of those tagged "experiment-dry" in the device run's
# order (their entries predicted as the GPU scenarios' are: the band test checks the
# prediction, runner/gpu_prediction.py), then slow, then gpu.
_DRY = sorted((n for n, _ in scenarios.for_tests("experiment-dry")), key=lambda n: (*scenarios.DEVICE_PLAN, n).index(n))
_RUNS = scenarios.for_tests("experiment") + [(n + scenarios.DRY_SUFFIX, ()) for n in _DRY]
SCENARIO_PARAMS = [pytest.param(n, id=n, marks=[getattr(pytest.mark, m) for m in ms])
                   for n, ms in sorted(_RUNS, key=lambda run: ("gpu" in run[1], "slow" in run[1]))] + [
    # your model: pytest -m gpu --kv-gpu-model ID_OR_PATH (plugin/kinds.py USER_MODEL); skips without it
    pytest.param("model", id="model", marks=pytest.mark.gpu)]

# CUDA's caching allocator reserves blocks (c10/cuda/CUDACachingAllocator.cpp): up to 1 MiB
# in 2 MiB segments, 1-10 MiB in 20 MiB ones, larger rounded to 2 MiB; hundreds of tensors
# are live at the peak. Below 256 such blocks of analytic saving (gpu-tiny saves 79 KB),
# "half of it shows in peak reserved" would test the rounding: only exact bytes are checked.
MIN_SAVING_VISIBLE_IN_RESERVED = 256 * 2 * 2**20
# seed-arch-short: 8 of 32 layers, a quarter of the saving, the same per-step transient (hqq
# requantizes one layer's history: ~5 layers of full-precision cache, docs/facts.md).
PEAK_NOT_THE_FULL_MODEL = frozenset({"seed-arch-short"})
ALLOCATOR_SEGMENT = 20 * 2**20  # one large-pool segment: two runs' peaks may differ by it


@pytest.fixture(scope="module", params=SCENARIO_PARAMS)
def run(request, experiment_runs) -> experiment.ExperimentRun:
    return experiment_runs(request.param)


def test_cache_bytes_from_the_probe_equal_the_analytic_model(run):
    for m in run.measurements:
        assert m.metrics["cache_bytes"] == m.predicted_cache_bytes, (
            f"{m.backend}/b{m.batch}: cache holds {m.metrics['cache_bytes']} bytes, model says {m.predicted_cache_bytes}"
            f"{'; ' + m.notes if m.notes else ''}")


def test_quantized_cache_uses_clearly_less_at_the_large_batch(run):
    """The analytic saving S = cache_none - cache_quantized at the large batch is >= 50% of
    the unquantized cache (4-bit codes and two scalars a group: < 1/3), realized in exact
    bytes, and on GPU at least half of it shows in peak reserved memory."""
    batch = run.scenario.large_batch
    for backend in run.scenario.backends:
        if backend == "none":
            continue
        none, quant = run.get("none", batch), run.get(backend, batch)
        saving = none.predicted_cache_bytes - quant.predicted_cache_bytes
        assert saving >= 0.5 * none.predicted_cache_bytes, (backend, saving, none.predicted_cache_bytes)
        assert none.metrics["cache_bytes"] - quant.metrics["cache_bytes"] == saving
        if (run.scenario.device == "cuda" and saving >= MIN_SAVING_VISIBLE_IN_RESERVED
                and run.scenario.name not in PEAK_NOT_THE_FULL_MODEL):
            realized = none.metrics["peak_reserved"] - quant.metrics["peak_reserved"]
            assert realized >= 0.5 * saving, (
                f"{backend} b{batch}: peak reserved saves {realized / 2**20:.0f} MiB, "
                f"analytic cache saving {saving / 2**20:.0f} MiB")


def test_one_short_prompt_saves_little(run):
    """The seed: one prompt, few tokens, little saved: at most the unquantized cache plus as
    much again in DynamicCache's concatenation transient (docs/facts.md), on GPU plus one
    allocator segment."""
    if 1 not in run.scenario.batch_sizes:
        pytest.skip(f"{run.scenario.name} has no batch 1")
    metric, slack = ("peak_reserved", ALLOCATOR_SEGMENT) if run.scenario.device == "cuda" else ("peak_allocated", 0)
    none = run.get("none", 1)
    for backend in run.scenario.backends:
        quant = run.get(backend, 1)
        saved = none.metrics[metric] - quant.metrics[metric]
        assert saved <= 2 * none.predicted_cache_bytes + slack, (
            f"{backend} b1 saved {saved / 2**20:.1f} MiB of {metric}; the whole unquantized cache is "
            f"{none.predicted_cache_bytes / 2**20:.1f} MiB")


def test_ratios_within_baseline_bands(run):
    """Every compared ratio within its stored band (one with no entry fails, naming the command)."""
    failing = comparison.problems([v for v in run.verdicts if not v.key.startswith("none/")])
    assert not failing, "\n".join(failing)


def test_the_unquantized_reference_within_its_band(run):
    """none's own peak where the scenario stores it: every ratio divides by it, so its
    regression flatters every ratio (fault ``unquantized_copies``)."""
    from kvcache_repro.core.metrics import REFERENCE_METRICS

    if not REFERENCE_METRICS & set(run.scenario.baseline_metrics):
        pytest.skip(f"{run.scenario.name} stores no reference of its own (its ratios' bands only)")
    reference = [v for v in run.verdicts if v.key.startswith("none/")]
    assert reference, "the scenario lists a reference metric but the run compared none"
    failing = comparison.problems(reference)
    assert not failing, "the unquantized reference moved:\n" + "\n".join(failing)


def test_peak_allocated_above_weights_covers_the_cache(run):
    """What generate() allocated beyond weights and inputs holds at least its final cache
    (else the probe missed storages or counted the weights twice)."""
    for m in run.measurements:
        grown = m.metrics["peak_allocated"] - m.before_bytes
        assert grown >= m.metrics["cache_bytes"], (m.backend, m.batch, grown, m.metrics["cache_bytes"])
