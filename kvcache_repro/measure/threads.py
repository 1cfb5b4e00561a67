"""How many threads torch computes with in the suite: one, unless KVQ_TORCH_THREADS says
otherwise. On 2 cores with one kept busy by another process, every OpenMP region waits for
the thread that lost its core: a 1x256 @ 256x1024 linear took 5-16 ms at two threads, 0.07
ms at one. Exact measurements do not depend on it (tests/test_peak.py checks 1 vs 2).
"""
from __future__ import annotations

import os

ENV = "KVQ_TORCH_THREADS"


def configured() -> int:
    raw = os.environ.get(ENV, "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={raw!r}: give a positive number of threads (default 1)")
    return n


def pin() -> int:
    import torch

    n = configured()
    torch.set_num_threads(n)
    return n
