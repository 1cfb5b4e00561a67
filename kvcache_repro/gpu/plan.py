"""The GPU plan's predicted time: how long each CUDA scenario's rows take on an H100, from
its stored prediction's terms (runner/gpu_prediction.py). pytest -m gpu prints it in its
header (plugin/options.py); the device run's wall_seconds per row are what to check it with."""
from __future__ import annotations

from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.measure import scenarios
from kvcache_repro.runner.gpu_prediction import full_architecture
from kvcache_repro.verdicts import baseline_file, paths

# Predicted, not measured (no GPU has run this suite; the device run's wall_seconds per row
# replace it): a row = process start (imports, CUDA init, model build) + per decode step the
# kernel launches of each layer (HF eager decode is launch-bound at these sizes: each backend
# kind's cuda_layer_step_s, backends/kinds/) + the bytes read at HBM3's
# 3.35 TB/s (weights; the cache at its mean length, 3x for a quantized one: packed codes
# read, the full-precision copy written and read). Worth a factor of ~2 either way.
ROW_START_S = 12.0
HBM_BYTES_PER_S = 3.35e12
QUANTIZED_TRAFFIC = 3


def planned_seconds(target: scenarios.Scenario) -> float | None:
    """Predicted wall seconds of ``target``'s rows on an H100, from its stored prediction's
    terms (None where it has none: seed)."""
    from kvcache_repro.backends.offline import arch_config_kwargs

    entries = baseline_file.load(paths.baseline_path(target.name)).entries
    alloc = next((e for e in entries.values() if e.metric == "peak_allocated" and baseline_file.is_predicted(e)), None)
    if alloc is None or target.model == "checkpoint":
        return None
    layers = arch_config_kwargs(full_architecture(target))["num_hidden_layers"]
    weights = alloc.produced_by["prediction"]["bytes"]["weights"]
    total = 0.0
    for batch in target.batch_sizes:
        cache = next(e for e in entries.values() if e.metric == "cache_bytes" and e.batch == batch)
        mean_cache = cache.produced_by["prediction"]["bytes"]["none_cache"] / 2
        for backend in target.backends:
            kind = BACKENDS[backend].kind
            traffic = weights + mean_cache * (QUANTIZED_TRAFFIC if kind.quantized else 1)
            step = layers * kind.cuda_layer_step_s + traffic / HBM_BYTES_PER_S
            total += ROW_START_S + target.tokens(batch) * step
    return total
