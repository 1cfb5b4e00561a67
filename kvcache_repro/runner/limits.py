"""How long one worker (one backend x batch of a scenario) may run before it is killed.

limit = (startup + new_tokens x per-token budget of the device) x KVQ_WORKER_TIMEOUT_SCALE

- startup 120 s: ~5x the imports and model load on the 2-core dev machine under load; a
  hub checkpoint (``seed``) may download 16 GB first: 1800 s.
- per token: CPU 2.0 s, over twice the slowest row measured (`cpu`'s hqq4 at 64 rows:
  0.88 s/token; at 48 rows x 200 beside another row: 0.68 s/token); CUDA 0.5 s. ``--worker-timeout S`` sets the limit outright.
"""
from __future__ import annotations

import os

STARTUP_S = 120.0
DOWNLOAD_STARTUP_S = 1800.0
PER_TOKEN_S = {"cpu": 2.0, "cuda": 0.5}
SCALE_ENV = "KVQ_WORKER_TIMEOUT_SCALE"


def worker_seconds(scenario) -> float:
    raw = os.environ.get(SCALE_ENV, "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = 0.0
    if not scale > 0:
        raise ValueError(f"{SCALE_ENV}={raw!r}: give a positive factor (default 1)")
    startup = DOWNLOAD_STARTUP_S if scenario.model == "checkpoint" else STARTUP_S
    tokens = max(scenario.tokens(b) for b in scenario.batch_sizes)
    return (startup + tokens * PER_TOKEN_S[scenario.device]) * scale
