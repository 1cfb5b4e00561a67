"""The machine a number was measured on: its CPU and the code path torch, oneDNN and MKL
take in this process. Recorded in baselines' produced_by and in results.json, so that a
number says where it came from, and a band can name the machines its spread covers."""
from __future__ import annotations

import os
import platform
from pathlib import Path

# What steers the kernels a CPU run takes (kvcache_repro/measure/spread.py varies them).
KNOBS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "KVQ_TORCH_THREADS")


def cpu_model() -> str:
    """The CPU's model name and its widest vector ISA, as /proc/cpuinfo says."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "")
    return f"{name} ({isa})" if isa else name


def machine() -> dict:
    """This process's CPU and the code path torch, oneDNN and MKL take in it: recorded in
    baselines' produced_by and in results.json, so a number says where it came from."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in KNOBS if k in os.environ}}
