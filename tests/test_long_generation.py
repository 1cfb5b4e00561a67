"""The seed's length in the default tier: a 8-token prompt and 1,000 decoded tokens (the
seed's 1,000 new tokens, 15 flushes at its residual 64) through every quantized backend,
on a tiny-width Llama's cache (2 layers, 2 KV heads x 32), 2 rows, the seed's G 128 / R 64,
driven as generate() drives it but without the model (the cache is what is measured; 1,000
forwards of even a tiny model took 15 s a backend).

After every flush (and at the end) each layer's storage is checked against the analytic
model (accounting.py): the tokens in the residual, then the exact bytes. A layer that
stops flushing after 512 quantized tokens, which no shorter test reaches, fails here
naming the token where its residual overflowed; a layer that keeps values dense fails
naming what it holds. Peak live bytes of the whole run are reported per backend.
"""
from __future__ import annotations

import pytest
import torch

from kvcache_repro.backends import caches, offline
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.measure import accounting

PROMPT, NEW, ROWS = 8, 1000, 2  # the seed's 1,000 new tokens: 999 fed back
SETTINGS = caches.QuantSettings(q_group_size=128, residual_length=64)  # the seed's
LONG_BACKENDS = [b for b in BACKENDS.values() if b.quantized]


@pytest.fixture(scope="module")
def config():
    from transformers import LlamaConfig

    return LlamaConfig(**offline.arch_config_kwargs("dry-tiny"))


def _residual_tokens(layer) -> int:
    storage = caches.layer_storage(layer)
    return 0 if storage.residual_keys is None else storage.residual_keys.shape[-2]


@torch.inference_mode()
def _decode(config, spec, check):
    """The cache as generate() drives it, without the model: each layer's update with the
    prompt's K/V, then one token's at a time (seeded random values: the bytes, flushes and
    transients do not depend on them), ``check(cache, tokens)`` after each step."""
    cache = caches.build_cache(spec, config, SETTINGS)
    g = torch.Generator().manual_seed(0)
    shape = (ROWS, config.num_key_value_heads, 0, config.head_dim)

    def step(n):
        for layer in range(config.num_hidden_layers):
            kv = [torch.randn(shape[:2] + (n,) + shape[3:], generator=g) for _ in range(2)]
            cache.update(*kv, layer)

    step(PROMPT)
    tokens = PROMPT
    check(cache, tokens)
    for _ in range(NEW - 1):
        step(1)
        tokens += 1
        check(cache, tokens)
    return cache


@pytest.mark.parametrize("spec", LONG_BACKENDS, ids=[b.name for b in LONG_BACKENDS])
def test_the_seed_s_length_flushes_and_stores_the_analytic_bytes_throughout(config, spec):
    if spec.broken:
        pytest.skip(spec.broken)
    g = offline.arch_config_kwargs("dry-tiny")
    try:
        caches.check_quantizable(spec, SETTINGS, batch=ROWS, kv_heads=g["num_key_value_heads"], head_dim=g["head_dim"],
                                 prompt_len=PROMPT, new_tokens=NEW)
    except ValueError as error:
        pytest.skip(f"{spec.name} cannot quantize these shapes: {error}")
    geometry = accounting.CacheGeometry(g["num_hidden_layers"], ROWS, g["num_key_value_heads"], g["head_dim"],
                                        torch.float32)
    checked = []

    def check(cache, tokens):
        _, residual = accounting.token_split(spec, SETTINGS, PROMPT, tokens)
        flushed = spec.group_wise and residual == 0 and tokens > PROMPT
        if not (flushed or tokens == PROMPT + NEW - 1):
            return
        for i, layer in enumerate(caches.cache_layers(cache)):
            held = _residual_tokens(layer)
            assert held == residual, (
                f"{spec.name}: after {tokens} tokens layer {i}'s residual holds {held} tokens, the model says "
                f"{residual} (residual_length {SETTINGS.residual_length}): "
                + ("the layer stopped flushing" if held > residual else "it flushed early"))
        measured = accounting.cache_bytes(cache)
        predicted = accounting.predict_cache_bytes(spec, SETTINGS, geometry, prompt_len=PROMPT, total_tokens=tokens)
        assert measured == predicted, (f"{spec.name}: after {tokens} tokens the cache holds {measured}, the analytic "
                                       f"model says {predicted}; {accounting.describe(cache)}")
        checked.append(tokens)

    _decode(config, spec, check)
    expected = 1 + (NEW - 1) // SETTINGS.residual_length if spec.group_wise else 1
    assert len(checked) == expected, checked  # every flush was checked (15 at the seed's settings) and the end
