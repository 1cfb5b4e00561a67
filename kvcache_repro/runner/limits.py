"""How long one worker (one backend x batch of a scenario) may run before it is killed.

limit = (startup + new_tokens x per-token budget of the device) x KVQ_WORKER_TIMEOUT_SCALE

- startup 120 s: a fresh interpreter importing torch + transformers (~8-10 s here),
  building or loading the model (SmolLM2 from its GGUF ~13 s; seed-geometry's random
  build seconds), the extension load; ~5x what the 2-core dev machine needs under load.
  A hub checkpoint (``seed``) may download 16 GB first: 1800 s.
- per new token: CPU 2.0 s, CUDA 0.5 s. The slowest CPU row measured is `cpu`'s hqq4 at
  64 rows: 113 s for 128 tokens (0.88 s/token, exact peak tracker on); seed-geometry
  ~0.3 s/token. 2.0 s is over twice the worst, for a loaded machine. On CUDA the seed's
  1000 tokens at batch 200 get 620 s in all.

One number per scenario (its largest batch sets the pace) keeps the rule explainable;
a machine slower than that scales it with KVQ_WORKER_TIMEOUT_SCALE, and
``./kvq experiment --worker-timeout S`` sets it outright.
"""
from __future__ import annotations

import os

STARTUP_S = 120.0
DOWNLOAD_STARTUP_S = 1800.0
PER_TOKEN_S = {"cpu": 2.0, "cuda": 0.5}
SCALE_ENV = "KVQ_WORKER_TIMEOUT_SCALE"


def scale() -> float:
    raw = os.environ.get(SCALE_ENV, "1")
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{SCALE_ENV}={raw!r}: give a positive factor (default 1)")
    return value


def worker_seconds(scenario) -> float:
    startup = DOWNLOAD_STARTUP_S if scenario.model == "checkpoint" else STARTUP_S
    return (startup + scenario.new_tokens * PER_TOKEN_S[scenario.device]) * scale()
