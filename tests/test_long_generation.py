"""The seed's length in the default tier (kvcache_repro/measure/long_run.py): 8 + 1,000
tokens through every quantized cache, checked after every flush against the analytic
model (residual tokens, then exact bytes), and the run's peak: the unquantized cache's
against its formula, each quantized one's against baselines/long-cache.json (the seed's
quanto4 and hqq4 in the default tier, the others with --kv-run-slow).
"""
from __future__ import annotations

import pytest

from kvcache_repro.backends import caches
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.measure import accounting, long_run
from kvcache_repro.measure.long_run import NEW, PROMPT, ROWS, SETTINGS
from kvcache_repro.verdicts import baseline_file, comparison
from kvcache_repro.verdicts import long_run as long_run_verdicts

LONG_BACKENDS = [b for b in BACKENDS.values() if b.quantized]
SEED_BACKENDS = ("quanto4", "hqq4")
PEAK_PARAMS = [pytest.param(b, id=b.name, marks=() if b.name in SEED_BACKENDS else pytest.mark.slow)
               for b in LONG_BACKENDS]


def _skip_unless_quantizable(spec):
    if why := long_run.cannot_run(spec):
        pytest.skip(why)


@pytest.fixture(scope="module")
def none_peak():
    return long_run.run(BACKENDS["none"])


def test_the_unquantized_cache_peaks_at_its_formula(none_peak):
    """DynamicLayer's peak (long_run.none_peak_bytes): a reference that grows (fault
    ``unquantized_copies``) would read as the quantized caches saving more."""
    expected = long_run.none_peak_bytes()
    assert none_peak == expected, (f"the unquantized cache peaked at {none_peak} bytes over {PROMPT + NEW - 1} "
                                   f"tokens, its formula says {expected} ({none_peak / expected:.3f}x)")


@pytest.mark.parametrize("spec", LONG_BACKENDS, ids=[b.name for b in LONG_BACKENDS])
def test_the_seed_s_length_flushes_and_stores_the_analytic_bytes_throughout(spec):
    _skip_unless_quantizable(spec)
    geometry = long_run.geometry()
    checked = []

    def check(cache, tokens):
        _, residual = accounting.token_split(spec, SETTINGS, PROMPT, tokens)
        flushed = spec.group_wise and residual == 0 and tokens > PROMPT
        if not (flushed or tokens == PROMPT + NEW - 1):
            return
        for i, layer in enumerate(caches.cache_layers(cache)):
            residual_keys = caches.layer_storage(layer).residual_keys
            held = 0 if residual_keys is None else residual_keys.shape[-2]
            assert held == residual, (
                f"{spec.name}: after {tokens} tokens layer {i}'s residual holds {held} tokens, the model says "
                f"{residual} (residual_length {SETTINGS.residual_length}): "
                + ("the layer stopped flushing" if held > residual else "it flushed early"))
        measured = accounting.cache_bytes(cache)
        predicted = accounting.predict_cache_bytes(spec, SETTINGS, geometry, prompt_len=PROMPT, total_tokens=tokens)
        assert measured == predicted, (f"{spec.name}: after {tokens} tokens the cache holds {measured}, the analytic "
                                       f"model says {predicted}; {accounting.describe(cache)}")
        checked.append(tokens)

    long_run.run(spec, check, track=False)
    expected = 1 + (NEW - 1) // SETTINGS.residual_length if spec.group_wise else 1
    assert len(checked) == expected, checked  # every flush was checked (15 at the seed's settings) and the end


@pytest.mark.parametrize("spec", PEAK_PARAMS)
def test_the_seed_s_length_peaks_at_its_baseline(spec, none_peak):
    """The run's peak over none's against baselines/long-cache.json (faults
    ``dequantize_via_float32``, ``stop_flushing_after_512``)."""
    _skip_unless_quantizable(spec)
    peak = long_run.run(spec)
    stored = baseline_file.load(long_run_verdicts.baseline_path())
    verdict = comparison.compare(stored, spec.name, ROWS, "peak_allocated", peak / none_peak)
    assert verdict.passed, (f"{spec.name}: peak {peak} bytes over the seed's length (none: {none_peak}); "
                            + verdict.message)
