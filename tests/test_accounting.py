"""What a cache really holds equals the analytic model (measure/accounting.py) to the byte:
full-precision storage, an extra copy, an ignored residual_length or more bits part them.
"""
from __future__ import annotations

import pytest
import torch

from kvcache_repro.backends import caches, generation
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.backends.models import kv_geometry, tiny_model
from kvcache_repro.measure import accounting

# 39 tokens fed back: 2 flushes at residual 16, 7 left; quantized lengths keep hqq axis-1 whole.
PROMPT, NEW = 16, 40
SETTINGS = caches.QuantSettings(q_group_size=32, residual_length=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cache_bytes_equal_the_analytic_model(backend, dtype, batch_size):
    if backend.broken:
        pytest.skip(backend.broken)
    model = tiny_model("llama", dtype)
    ids = torch.randint(3, 256, (batch_size, PROMPT), generator=torch.Generator().manual_seed(1))
    run = generation.generate(model, ids, backend, SETTINGS, NEW)
    g = kv_geometry(model)
    predicted = accounting.predict_cache_bytes(
        backend, SETTINGS, accounting.CacheGeometry(g.layers, batch_size, g.kv_heads, g.head_dim, dtype),
        prompt_len=PROMPT, total_tokens=PROMPT + NEW - 1)
    measured = accounting.cache_bytes(run.cache)
    assert measured == predicted, (f"{backend.name} {dtype}: measured {measured} != predicted {predicted}; "
                                   f"{accounting.describe(run.cache)}")


@pytest.mark.needs_backends('quanto4')
def test_dense_nbytes_of_quanto_tensors_is_not_what_is_stored():
    """The trap the accounting avoids: quanto's tensor subclass reports the dense size."""
    x = torch.randn(1, 2, 32, 16)
    qstate, _ = caches.quantize_once(BACKENDS["quanto4"], SETTINGS, x)
    assert qstate.nbytes == x.nbytes  # what a naive count would use
    groups = x.numel() // SETTINGS.q_group_size
    assert accounting.tensor_bytes(qstate) == x.numel() // 2 + groups * 2 * 4  # 4-bit codes + fp32 scale/shift
