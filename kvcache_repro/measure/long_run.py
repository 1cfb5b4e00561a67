"""The seed's length through a cache without the model (1,000 forwards of even a tiny
model took 15 s a backend): an 8-token prompt and 1,000 new tokens (999 fed back, 15
flushes), the seed's G 128 / R 64 and float16, dry-tiny's K/V geometry (2 layers, 2 KV
heads x 32), 2 rows. Each layer's update gets seeded random K/V, the prompt's then one
token's at a time, as in generate(). Stored per quantized backend (verdicts/long_run.py):
its exact peak over the unquantized cache's, whose own peak has a formula.
"""
from __future__ import annotations

import contextlib

import torch

from kvcache_repro.backends import caches, offline
from kvcache_repro.measure import accounting
from kvcache_repro.measure.peak import PeakTracker

PROMPT, NEW, ROWS = 8, 1000, 2  # the seed's 1,000 new tokens: 999 fed back
SETTINGS = caches.SEED_SETTINGS
DTYPE = torch.float16  # the seed's
ARCH = "dry-tiny"
NAME = "long-cache"


def config():
    from transformers import LlamaConfig

    return LlamaConfig(**offline.arch_config_kwargs(ARCH))


def geometry() -> accounting.CacheGeometry:
    g = offline.arch_config_kwargs(ARCH)
    return accounting.CacheGeometry(g["num_hidden_layers"], ROWS, g["num_key_value_heads"], g["head_dim"], DTYPE)


@torch.inference_mode()
def run(spec, check=lambda cache, tokens: None, track: bool = True) -> int | None:
    """Peak live bytes of the run (above what was alive before it), ``check(cache, tokens)``
    called after each step; None with ``track`` off (the tracker triples the run's time)."""
    cfg = config()
    g = torch.Generator().manual_seed(0)
    tracker = PeakTracker() if track else None
    with tracker or contextlib.nullcontext():
        cache = caches.build_cache(spec, cfg, SETTINGS)
        for tokens in range(PROMPT, PROMPT + NEW):
            n = PROMPT if tokens == PROMPT else 1
            for layer in range(cfg.num_hidden_layers):  # K and V held by the call only, as generate() does
                cache.update(*[torch.randn((ROWS, cfg.num_key_value_heads, n, cfg.head_dim), generator=g,
                                           dtype=DTYPE) for _ in range(2)], layer)
            check(cache, tokens)
    return tracker.peak if tracker else None


def none_peak_bytes() -> int:
    """The unquantized cache's peak: at the last layer's last update, torch.cat builds the
    T-token values while the old T-1 are alive, beside every layer's final T keys and the
    step's two one-token inputs: 2LT + T + 1 token-tensors of one layer (T = prompt +
    fed-back tokens)."""
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
