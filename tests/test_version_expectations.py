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
        request.applymarker(pytest.mark.xfail(strict=True, reason=expectation.issue))


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


def test_beam_search_through_near_lossless_cache_matches_unquantized(request):
    """hqq 8-bit, axis 1 (groups within a row, so beams do not share groups), on the
    small real model where beams are well separated: the quantized cache's error
    (KL ~1e-4 nats/token) is far below the score gaps between beams. A cache whose
    quantized store keeps a stale beam order attends to the wrong history and diverges."""
    _pin(request, expectations.beam_search_matches())
    from kvcache_repro.models import small_real_model
    from kvcache_repro.quality import corpus_ids

    model, tokenizer = small_real_model(torch.float32)
    ids = corpus_ids(tokenizer, 1, 64)
    settings = caches.QuantSettings(q_group_size=64, residual_length=16)
    reference = generation.beam_search(model, ids, BACKENDS["none"], settings, 40)
    quantized = generation.beam_search(model, ids, BACKENDS["hqq8-axis1"], settings, 40)
    differ = int((reference != quantized).sum())
    assert differ == 0, f"transformers {VERSION}: beam search with hqq8-axis1 differs from unquantized in {differ} tokens"
