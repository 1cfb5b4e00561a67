"""Where a number came from, read in this one place: the package versions it depends on, the
device, the machine (its CPU and the code path torch, oneDNN and MKL take in this process).
Recorded in baselines' produced_by and in results.json, so a band can name its machines."""
from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
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
    """This process's CPU and the code path torch, oneDNN and MKL take in it."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in KNOBS if k in os.environ}}


# The packages a number depends on: recorded with it, compared for drift, and those a
# per-release range can belong to.
PACKAGES = ("transformers", "torch", "optimum-quanto", "hqq")


def installed(package: str) -> str | None:
    """The installed release of ``package`` (package metadata: no import), None without one."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """The installed release of each of ``packages`` (one not installed is left out)."""
    return {name: v for name in packages if (v := installed(name)) is not None}


def produced_by(device: str, source: str | None, settings: dict | None = None, *, versions: dict | None = None,
                with_machine: bool = True, **extra) -> dict:
    """Where a stored number came from (a baseline entry's ``produced_by``, a claims table's
    provenance): the package versions (default: installed), this process's machine (not with
    ``with_machine`` False: measured elsewhere), the device in words, today's date, the
    settings and the recording command (None: left out); ``extra``: the caller's own fields."""
    out = {"versions": package_versions() if versions is None else versions}
    if with_machine:
        out["machine"] = machine()
    out.update(device=device, date=datetime.date.today().isoformat())
    out.update({k: v for k, v in (("settings", settings), ("source", source)) if v is not None})
    return {**out, **extra}


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    """The device's name for a baseline key: CUDA's from a child process (no CUDA context here)."""
    if device != "cuda":
        return "cpu"
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "unknown CUDA device"


def device_label(device: str) -> str:
    """The device in words: the CUDA card's name, else this CPU's core count and architecture."""
    return device_name("cuda") if device == "cuda" else f"{os.cpu_count()}-core CPU ({platform.machine()})"
