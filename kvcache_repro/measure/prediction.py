"""The seed's GPU ratios predicted from a CPU run with the seed model's KV geometry.

A run of ``b`` rows x ``T`` tokens of seed-geometry (32 layers, 8 KV heads x 128, fp16,
G 128, R 64) predicts the seed's 200 rows x 1,008 tokens (8-token prompts + 1,000 new) as

    weights_seed + cache(200 rows, 1,008 tokens) + transient x (200 / b) x (1,008 / T)

weights_seed: the 5.31 GiB the seed printed as allocated before tokenizing (NF4 Llama-3-8B,
docs/facts.md); cache: the analytic byte model (accounting.py, exact); the transient (peak -
weights - final cache) is one layer's worth of cache-sized tensors, so it grows with rows and
tokens. The seed's published ratios (quanto 0.338, HQQ 0.524 of none's 55.99 GB) are of
reserved memory: above the live peak by the allocator's cached blocks (measure/reserved.py).
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
SEED_WEIGHTS_BYTES = int(5.31 * GIB)
SEED_ROWS, SEED_PROMPT, SEED_NEW_TOKENS = 200, 8, 1000
SEED_RESERVED_GB = {"none": 55.99, "quanto4": 18.94, "hqq4": 29.34}
SEED_RATIOS = {b: SEED_RESERVED_GB[b] / SEED_RESERVED_GB["none"] for b in ("quanto4", "hqq4")}


@dataclass(frozen=True)
class Prediction:
    backend: str
    cache_bytes: int  # analytic, at the seed's size
    transient_bytes: int  # measured, scaled to the seed's size
    peak_bytes: int  # weights_seed + cache + transient

    def ratio_to(self, none: "Prediction") -> float:
        return self.peak_bytes / none.peak_bytes


def cache_bytes(arch: str, scenario, backend: str, rows: int, prompt_len: int, tokens: int) -> int:
    """The analytic bytes (accounting.py) of every layer's cache of offline.ARCHS' ``arch``
    after ``tokens``, with ``scenario``'s settings and dtype."""
    import torch

    from kvcache_repro.measure import accounting
    from kvcache_repro.backends.matrix import BACKENDS
    from kvcache_repro.backends.offline import arch_config_kwargs

    a = arch_config_kwargs(arch)
    geometry = accounting.CacheGeometry(a["num_hidden_layers"], rows, a["num_key_value_heads"], a["head_dim"],
                                        getattr(torch, scenario.dtype))
    return accounting.predict_cache_bytes(BACKENDS[backend], scenario.settings, geometry,
                                          prompt_len=prompt_len, total_tokens=tokens).total


def predict(scenario, measurements) -> dict[str, Prediction]:
    """Per backend of a seed-geometry run (its largest batch), at the seed's size."""
    batch = max(m.batch for m in measurements)
    out = {}
    for m in (m for m in measurements if m.batch == batch):
        cache = cache_bytes(scenario.arch, scenario, m.backend, SEED_ROWS, SEED_PROMPT,
                            SEED_PROMPT + SEED_NEW_TOKENS - 1)
        scale = (SEED_ROWS / batch) * (SEED_PROMPT + SEED_NEW_TOKENS) / (m.prompt_len + m.new_tokens)
        transient = round(m.transient_bytes * scale)
        out[m.backend] = Prediction(m.backend, cache, transient, SEED_WEIGHTS_BYTES + cache + transient)
    return out


def ratios(scenario, measurements) -> dict[str, float]:
    p = predict(scenario, measurements)
    return {b: p[b].ratio_to(p["none"]) for b in p if b != "none"}


def lines(scenario, measurements) -> list[str]:
    p = predict(scenario, measurements)
    out = [f"prediction for the seed ({SEED_ROWS} rows x {SEED_PROMPT + SEED_NEW_TOKENS} tokens; weights "
           f"{SEED_WEIGHTS_BYTES / GIB:.2f} GiB as the seed printed; analytic cache + measured transient "
           "scaled):"]
    for b, x in p.items():
        seed = f"; the seed's reserved-memory ratio {SEED_RATIOS[b]:.3f}" if b in SEED_RATIOS else ""
        ratio = f", ratio to none {x.ratio_to(p['none']):.3f}" if b != "none" else ""
        out.append(f"  {b:>8}: peak {x.peak_bytes / GIB:6.2f} GiB (cache {x.cache_bytes / GIB:.2f}, "
                   f"transient {x.transient_bytes / GIB:.2f}){ratio}{seed}")
    return out
