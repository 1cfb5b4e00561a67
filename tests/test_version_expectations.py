"""Version-dependent behaviour of generate() with a quantized cache, pinned per version
range in kvcache_repro/expectations.py. Wrong-today entries are xfail(strict=True) with
the upstream issue, so a fix is noticed."""
from __future__ import annotations

import pytest
import torch

from kvcache_repro import caches, expectations, generation
from kvcache_repro.matrix import BACKENDS
from kvcache_repro.models import tiny_model

SETTINGS = caches.QuantSettings(q_group_size=32, residual_length=16)
VERSION = expectations.transformers.__version__


def _pin(request, expectation):
    if expectation.wrong:
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=expectation.issue))


def test_supported_version_is_detected():
    assert expectations.current_range().contains(VERSION)
    with pytest.raises(expectations.UnsupportedVersion, match=r"transformers 4\.46\.3 is not supported .*requirements"):
        expectations.current_range("4.46.3")


def test_generate_leaves_the_callers_cache_config_untouched(request):
    _pin(request, expectations.cache_config_untouched())
    config = caches.cache_config(BACKENDS["hqq4"], SETTINGS)
    before = dict(config)
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    generation.generate_with_cache_config(tiny_model("llama"), ids, config, 4)
    assert config == before, f"transformers {VERSION}: generate() changed cache_config {before} -> {config}"


def test_beam_reorder_reaches_the_quantized_store(request):
    """What beam search needs from a cache: after ``reorder_cache(beam_idx)`` every row
    attends to the history of the beam it now continues. Four distinct random rows go
    through prefill and 20 decode steps (residual 8: two flushes into the quantized
    store), then a reorder and one more step, in a near-lossless hqq 8-bit cache and in
    the unquantized one. The outputs must agree to within 8-bit error (step/2 of a
    group of N(0,1) values, < 0.05); a stale quantized store leaves whole rows of other
    beams, off by O(1)."""
    _pin(request, expectations.beam_search_matches())
    model = tiny_model("llama")
    settings = caches.QuantSettings(q_group_size=32, residual_length=8)
    g = torch.Generator().manual_seed(0)
    shape = lambda s: (4, 2, s, 16)  # noqa: E731  (batch of 4 beams, 2 kv heads, head_dim 16)
    steps = [torch.randn(shape(16), generator=g)] + [torch.randn(shape(1), generator=g) for _ in range(20)]
    last = torch.randn(shape(1), generator=g)
    beam_idx = torch.tensor([2, 2, 0, 3])  # beams 1 and 3 die, beam 2 forks
    outputs = {}
    for name in ("none", "hqq8-axis1"):
        cache = caches.build_cache(BACKENDS[name], model.config, settings)
        for x in steps:
            caches.update_layer(cache, 0, x, x)
        caches.reorder(cache, beam_idx)
        outputs[name], _ = caches.update_layer(cache, 0, last, last)
    err = (outputs["hqq8-axis1"] - outputs["none"]).abs().amax(dim=(1, 2, 3))
    assert bool((err < 0.05).all()), f"transformers {VERSION}: max error per beam after reorder {err.tolist()}"
