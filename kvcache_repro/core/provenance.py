"""Where a number came from: the package versions it depends on, the device, the machine
(its CPU and the code path torch, oneDNN and MKL take in this process). Recorded in
baselines' produced_by and in results.json, so that a number says where it came from, and
a band can name the machines its spread covers. The one place that reads them."""
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
    """This process's CPU and the code path torch, oneDNN and MKL take in it: recorded in
    baselines' produced_by and in results.json, so a number says where it came from."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in KNOBS if k in os.environ}}


# The packages a number depends on: recorded with it, compared for drift, and the ones a
# baseline's per-release range can belong to (releases/package_specs.py installs them).
PACKAGES = ("transformers", "torch", "optimum-quanto", "hqq")


def installed(package: str) -> str | None:
    """The installed release of ``package`` (package metadata: no import), None without one."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """The installed release of each of ``packages`` (one not installed is left out): the
    versions a baseline depends on, recorded with it and compared for drift."""
    return {name: v for name in packages if (v := installed(name)) is not None}


def produced_by(device: str, source: str | None, settings: dict | None = None, *, versions: dict | None = None,
                with_machine: bool = True, **extra) -> dict:
    """Where a stored number came from (a baseline entry's ``produced_by``, a claims table's
    provenance): the package versions (default: the installed ones), this process's machine
    (``with_machine`` False: numbers measured elsewhere), the device in words, today's date,
    the settings it was measured with and the command that recorded it (None: left out);
    ``extra``: the caller's own fields (model, kind, proxies, ...)."""
    out = {"versions": package_versions() if versions is None else versions}
    if with_machine:
        out["machine"] = machine()
    out.update(device=device, date=datetime.date.today().isoformat())
    if settings is not None:
        out["settings"] = settings
    if source is not None:
        out["source"] = source
    return {**out, **extra}


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


def device_label(device: str) -> str:
    """The device in words for a provenance: the CUDA card's name, else this CPU's core
    count and architecture."""
    return device_name("cuda") if device == "cuda" else f"{os.cpu_count()}-core CPU ({platform.machine()})"
