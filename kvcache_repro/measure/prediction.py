"""The seed's GPU ratios predicted from a CPU run with the seed model's KV geometry.

A run of ``b`` rows x ``T`` tokens of the seed's per-layer geometry (seed-geometry:
32 layers, 8 KV heads x 128, fp16, G 128, R 64) predicts the seed's 200 rows x 1,008
tokens (8-token prompts + 1,000 new) as

    weights_seed + cache(200 rows, 1,008 tokens) + transient x (200 / b) x (1,008 / T)

- weights_seed: 5.31 GiB, what the seed's notebook printed as allocated before
  tokenizing (NF4 Llama-3-8B, fp16 compute; docs/facts.md) - a stated constant;
- cache: the analytic byte model (accounting.py), exact at any size (tests/test_accounting.py);
- transient: measured (peak - weights - cache at the end). Every transient here is one
  layer's worth of cache-sized tensors (a dequantized copy, hqq's requantization
  temporaries, DynamicCache's concatenation), so it grows with rows and tokens.

The seed's published ratios are of reserved memory after generation: none 55.99,
quanto 18.94, HQQ 29.34 GB -> 0.338 and 0.524. Reserved is above the peak of live bytes:
the caching allocator keeps freed blocks and rounds them up (2 MiB / 20 MiB segments),
and an unquantized cache that grows by concatenation every step leaves blocks of every
size behind - which is why the seed's none (55.99 GB) is far above its live peak
(about 30 GiB here) while the quantized runs are closer to theirs.
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


def predict(scenario, measurements) -> dict[str, Prediction]:
    """Per backend of a seed-geometry run (its largest batch), at the seed's size."""
    import torch

    from kvcache_repro.measure import accounting
    from kvcache_repro.backends.matrix import BACKENDS
    from kvcache_repro.backends.offline import arch_config_kwargs

    arch = arch_config_kwargs(scenario.arch)
    geometry = accounting.CacheGeometry(arch["num_hidden_layers"], SEED_ROWS, arch["num_key_value_heads"],
                                        arch["head_dim"], getattr(torch, scenario.dtype))
    batch = max(m.batch for m in measurements)
    out = {}
    for m in (m for m in measurements if m.batch == batch):
        cache = accounting.predict_cache_bytes(BACKENDS[m.backend], scenario.settings, geometry,
                                               prompt_len=SEED_PROMPT,
                                               total_tokens=SEED_PROMPT + SEED_NEW_TOKENS - 1).total
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
           f"{SEED_WEIGHTS_BYTES / GIB:.2f} GiB as the seed printed; analytic cache + measured transient scaled):"]
    for b, x in p.items():
        seed = f"; the seed's reserved-memory ratio {SEED_RATIOS[b]:.3f}" if b in SEED_RATIOS else ""
        ratio = f", ratio to none {x.ratio_to(p['none']):.3f}" if b != "none" else ""
        out.append(f"  {b:>8}: peak {x.peak_bytes / GIB:6.2f} GiB (cache {x.cache_bytes / GIB:.2f}, transient "
                   f"{x.transient_bytes / GIB:.2f}){ratio}{seed}")
    return out
