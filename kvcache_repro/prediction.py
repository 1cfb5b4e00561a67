"""The seed's GPU ratios predicted from a CPU run with the seed model's KV geometry.

Peak bytes above the weights scale with the number of rows (every row holds its own
cache, dequantized copy and requantization temporaries), so a run of ``b`` rows predicts
200 rows as ``weights_seed + (200 / b) * (peak - weights_run)``. The seed's weights are
a stated constant: 5.31 GiB, what its notebook printed as allocated before tokenizing
(NF4 Llama-3-8B with fp16 compute; FACTS.md). Its published ratios are of reserved
memory after generation: none 55.99, quanto 18.94, HQQ 29.34 GB -> 0.338 and 0.524.

What differs, and why the prediction is not the seed's number:
- allocated vs reserved: the caching allocator's pool keeps freed blocks and rounds
  them up (2 MiB / 20 MiB segments), so reserved exceeds the peak of live bytes;
- tokens: the CPU run decodes fewer than the seed's 1,000 tokens, so the full-precision
  residual (up to 64 tokens) is a larger share of the quantized cache;
- kernels: flash-attention on CUDA allocates differently from CPU attention.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
SEED_WEIGHTS_BYTES = int(5.31 * GIB)
SEED_ROWS = 200
SEED_RESERVED_GB = {"none": 55.99, "quanto4": 18.94, "hqq4": 29.34}
SEED_RATIOS = {b: SEED_RESERVED_GB[b] / SEED_RESERVED_GB["none"] for b in ("quanto4", "hqq4")}


@dataclass(frozen=True)
class Prediction:
    backend: str
    predicted_peak_bytes: int
    predicted_ratio: float
    seed_ratio: float


def predict(measurements) -> list[Prediction]:
    """Predictions for each quantized backend of a seed-geometry run (largest batch)."""
    batch = max(m.batch for m in measurements)
    at = {m.backend: m for m in measurements if m.batch == batch}

    def scaled(m) -> int:
        above = m.metrics["peak_allocated"] - m.before_bytes
        return SEED_WEIGHTS_BYTES + round(above * SEED_ROWS / batch)

    none = scaled(at["none"])
    return [Prediction(b, scaled(at[b]), scaled(at[b]) / none, SEED_RATIOS[b])
            for b in ("quanto4", "hqq4") if b in at]


def lines(measurements) -> list[str]:
    batch = max(m.batch for m in measurements)
    out = [f"prediction for the seed (200 rows; weights {SEED_WEIGHTS_BYTES / GIB:.2f} GiB as the seed printed; "
           f"peak above weights x {SEED_ROWS}/{batch}):"]
    for p in predict(measurements):
        out.append(f"  {p.backend:>8}: predicted peak {p.predicted_peak_bytes / GIB:6.2f} GiB, ratio to none "
                   f"{p.predicted_ratio:.3f}; the seed's reserved-memory ratio {p.seed_ratio:.3f}")
    return out
