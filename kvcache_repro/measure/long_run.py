"""The seed's length through a cache without the model: an 8-token prompt and 1,000
decoded tokens (the seed's 1,000 new tokens: 999 fed back, 15 flushes at its residual
64), the seed's G 128 / R 64 and dtype (float16), on a tiny-width Llama's K/V geometry
(dry-tiny: 2 layers, 2 KV heads x 32), 2 rows. The cache is driven as generate() drives
it - each layer's update with the prompt's K/V, then one token's at a time - with seeded
random values (bytes, flushes and transients do not depend on them). 1,000 forwards of even
a tiny model took 15 s a backend; the cache alone is what is measured.

``run(spec, check)`` calls ``check(cache, tokens)`` after each step and returns the
exact peak of live tensor bytes of the whole run (peak.py), the inputs included.

    python -m kvcache_repro.verdicts.long_run record   # baselines/long-cache.json

The stored quantity per quantized backend is its peak over the unquantized cache's peak
in the same driver (exact bytes; identical on every CPU path, as cpu-tiny's are). The
unquantized peak itself has a formula (``none_peak_bytes``) and needs no baseline.
"""
from __future__ import annotations

import sys

import torch

from kvcache_repro.backends import caches, offline
from kvcache_repro.measure import accounting
from kvcache_repro.measure.peak import PeakTracker

PROMPT, NEW, ROWS = 8, 1000, 2  # the seed's 1,000 new tokens: 999 fed back
SETTINGS = caches.QuantSettings(q_group_size=128, residual_length=64)  # the seed's
DTYPE = torch.float16  # the seed's
ARCH = "dry-tiny"
NAME = "long-cache"


def config():
    from transformers import LlamaConfig

    return LlamaConfig(**offline.arch_config_kwargs(ARCH))


def geometry() -> accounting.CacheGeometry:
    g = offline.arch_config_kwargs(ARCH)
    return accounting.CacheGeometry(g["num_hidden_layers"], ROWS, g["num_key_value_heads"], g["head_dim"], DTYPE)


class _Untracked:
    peak = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.inference_mode()
def run(spec, check=lambda cache, tokens: None, track: bool = True) -> int | None:
    """Peak live bytes of the run (above what was alive before it); None with ``track``
    off (the exact tracker triples the run's time: 4 s instead of 1.6 for hqq4)."""
    cfg = config()
    g = torch.Generator().manual_seed(0)
    shape = (ROWS, cfg.num_key_value_heads, 0, cfg.head_dim)
    with PeakTracker() if track else _Untracked() as tracker:
        cache = caches.build_cache(spec, cfg, SETTINGS)

        def step(n):
            for layer in range(cfg.num_hidden_layers):
                kv = [torch.randn(shape[:2] + (n,) + shape[3:], generator=g, dtype=DTYPE) for _ in range(2)]
                cache.update(*kv, layer)

        step(PROMPT)
        tokens = PROMPT
        check(cache, tokens)
        for _ in range(NEW - 1):
            step(1)
            tokens += 1
            check(cache, tokens)
    return tracker.peak


def none_peak_bytes() -> int:
    """The unquantized cache's peak, from how DynamicLayer grows: it comes at the last
    layer's last update, when torch.cat builds the T-token values (T = prompt + fed-back
    tokens) while the old T-1 are alive; by then every layer holds its final T tokens of
    keys, and the step's one-token K and V are still held by the caller. In token-tensors
    of one layer: the final cache 2LT + the old values T-1 + the two inputs = 2LT + T + 1.
    (The keys' cat before it holds one token-tensor less.)"""
    geo = geometry()
    per_token = geo.elements(1) * geo.itemsize  # one layer's keys (or values) of one token
    total = PROMPT + NEW - 1
    return (2 * geo.layers * total + total + 1) * per_token


def cannot_run(spec) -> str | None:
    """Why ``spec`` cannot take this run (a broken backend, shapes it cannot quantize), or None."""
    if spec.broken:
        return spec.broken
    geo = geometry()
    try:
        caches.check_quantizable(spec, SETTINGS, batch=ROWS, kv_heads=geo.kv_heads, head_dim=geo.head_dim,
                                 prompt_len=PROMPT, new_tokens=NEW)
    except ValueError as error:
        return f"{spec.name} cannot quantize these shapes: {error}"
    return None


def peak_ratios(log=print) -> dict[str, float]:
    """Every quantized backend's peak over the unquantized one's, in this driver."""
    from kvcache_repro.backends.matrix import BACKENDS

    none = run(BACKENDS["none"])
    out = {}
    for spec in BACKENDS.values():
        if not spec.quantized:
            continue
        if why := cannot_run(spec):
            log(f"{spec.name}: not measured ({why})")
            continue
        out[spec.name] = run(spec) / none
        log(f"{spec.name}: peak {out[spec.name]:.4f} of none's")
    return out
