"""Where a number came from: the package versions it depends on, the device, the machine
(its CPU and the code path torch, oneDNN and MKL take in this process). Recorded in
baselines' produced_by and in results.json, so that a number says where it came from, and
a band can name the machines its spread covers. The one place that reads them."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

# What steers the kernels a CPU run takes (kvcache_repro/runner/spread.py varies them).
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


def package_versions() -> dict[str, str]:
    """The versions a baseline depends on, recorded with it and compared for drift."""
    from importlib.metadata import version

    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "optimum-quanto": version("optimum-quanto"), "hqq": version("hqq")}


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    """The device's name for a baseline key; CUDA's read in a child process, so this one
    holds no CUDA context (memory the workers' device would lose). CPU: "cpu" - every
    compared CPU quantity is an exact byte count, the same on every CPU (peak.py)."""
    if device != "cuda":
        return "cpu"
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "unknown CUDA device"
