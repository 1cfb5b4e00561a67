"""The seed's seven families x every backend: either the cache really quantizes, or
transformers raises its documented rejection - whichever the expectation table says."""
from __future__ import annotations

import pytest
import torch

from kvcache_repro import accounting, caches, expectations, generation
from kvcache_repro.matrix import BACKENDS
from kvcache_repro.models import kv_geometry, tiny_model

SETTINGS = caches.QuantSettings(q_group_size=32, residual_length=16)
PROMPT, NEW = 32, 24  # 23 tokens fed back: one flush at 16, 7 left in the residual

# Upper bound on quantized/unquantized bytes, derived: at most 8 bits per value plus a
# scale and a zero-point per 32 values (2 x 32 bits / 32 = 2 bits) = 10 of 32 bits in
# float32, i.e. 0.31, on the 48 quantized of 55 tokens; the 7 residual tokens stay at
# full size: 0.31 * 48/55 + 7/55 = 0.40. 0.5 leaves room; a cache that stored
# full-precision tensors would be at >= 1.0.
MAX_QUANTIZED_FRACTION = 0.5


def test_family_quantizes_or_is_rejected_as_documented(family, quantized_backend):
    if quantized_backend.backend == "hqq" and quantized_backend.nbits == 3 and quantized_backend.axis == 1:
        pytest.skip("hqq 3-bit axis 1 cannot dequantize (hqq bug, see caches.check_quantizable)")
    expected = expectations.family_support(family)
    version = expectations.transformers.__version__
    model = tiny_model(family)
    ids = torch.randint(3, 200, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    try:
        run = generation.generate(model, ids, quantized_backend, SETTINGS, NEW)
    except ValueError as error:
        assert caches.is_rejection(error), f"{family}/{quantized_backend.name}: unexpected error {error}"
        assert expected == "rejected", (
            f"transformers {version}: {family} with {quantized_backend.name} was rejected "
            f"but is expected to quantize: {error}")
        return
    assert expected == "quantizes", (
        f"transformers {version}: {family} with {quantized_backend.name} ran, expected a rejection; "
        f"quantized layers: {caches.quantized_layer_count(run.cache)}, bytes {accounting.cache_bytes(run.cache).total}")
    layers = kv_geometry(model).layers
    assert caches.quantized_layer_count(run.cache) == layers, "some layers hold no quantized storage"
    assert run.cache.get_seq_length() == PROMPT + NEW - 1
    reference = generation.generate(model, ids, BACKENDS["none"], SETTINGS, NEW)
    quantized, dense = accounting.cache_bytes(run.cache).total, accounting.cache_bytes(reference.cache).total
    assert 0 < quantized <= MAX_QUANTIZED_FRACTION * dense, (
        f"{family}/{quantized_backend.name}: {quantized} bytes vs {dense} unquantized")
