"""How many threads torch computes with in the suite: one, unless KVQ_TORCH_THREADS says
otherwise.

Why one: on the 2-core machines here, with another process on one core (CI's usual
state, one core kept busy by another process), every OpenMP parallel region waits for the thread
that lost its core. A 1x256 @ 256x1024 linear took 5-16 ms at two threads and 0.07 ms
at one; a decode step of the seed-geometry model 60-85 ms against a few ms. Exact
measurements (bytes, tokens) do not depend on it (tests/test_peak.py checks 1 vs 2
threads); the speed measurements pin one thread themselves (speed.py).
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
