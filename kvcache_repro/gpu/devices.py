"""CUDA_VISIBLE_DEVICES for each pytest-xdist worker, chosen before CUDA initialises.

The CUDA runtime reads CUDA_VISIBLE_DEVICES once, when the process first touches CUDA
(``torch.cuda.is_available()``, not ``import torch``), so the pytest plugin calls
apply_for_xdist_worker() when it is imported. An existing value (a scheduler's "2,3",
GPU-/MIG- UUIDs) is split among the workers, never replaced by bare indices; with more
workers than devices they share them (worker i takes i % n). Stdlib only: torch counts the
GPUs in a subprocess, so this process never initialises CUDA."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Callable, MutableMapping

# Set with the first assignment: its presence means "already narrowed", so a second call,
# or a process that inherits a worker's environment, keeps the one device it was given.
# The value is the CUDA_VISIBLE_DEVICES before (empty: it was unset).
ORIGINAL_ENV = "KVQ_CUDA_VISIBLE_DEVICES_ORIGINAL"

# Without any of these, Linux has no CUDA (or ROCm) device: the count skips the ~4 s torch
# import that every worker of the CPU tier would otherwise pay.
_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/dxg", "/dev/kfd")  # NVIDIA driver, WSL2, ROCm


def count_gpus(timeout: float = 120) -> int:
    """The CUDA devices torch sees, counted in a subprocess; 0 when there are none or it fails."""
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _DRIVER_PATHS):
        return 0
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
        return max(int(out.split()[-1]), 0)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def _devices(visible: str | None, count: Callable[[], int]) -> list[str] | None:
    """What the workers split: the entries of a set CUDA_VISIBLE_DEVICES, verbatim, else
    the indices of the GPUs counted. None: leave CUDA_VISIBLE_DEVICES as it is."""
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        # "" or "-1" is an explicit "no GPU" (CUDA stops at the first invalid entry)
        return entries if entries and entries[0] != "-1" else None
    n = count()
    return [str(i) for i in range(n)] if n > 0 else None


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'s' * (count != 1)}"


def _source(visible: str | None, devices: list[str]) -> str:
    return f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else f"{_n(len(devices), 'GPU')} counted"


def _shared(workers: int, devices: list[str]) -> str:
    return f"; {workers} workers share {_n(len(devices), 'device')}" if workers > len(devices) else ""


def assign(worker_index: int, workers: int, visible: str | None, count: Callable[[], int]) -> str | None:
    """CUDA_VISIBLE_DEVICES for worker ``worker_index`` of ``workers``, given the current
    value ``visible`` (None: unset) and ``count()``, the physical GPUs; None: keep it as
    it is (one worker, an explicit "no GPU", or no GPU counted)."""
    devices = _devices(visible, count) if workers > 1 else None
    return devices[worker_index % len(devices)] if devices else None


def plan_note(workers: int, visible: str | None, count: Callable[[], int] = count_gpus) -> str | None:
    """One line for the xdist controller's report header (a worker's header is never
    printed): the device each worker takes, or None where the workers keep everything."""
    devices = _devices(visible, count) if workers > 1 else None
    if not devices:
        return None
    taken = " ".join(f"gw{i}={devices[i % len(devices)]}" for i in range(workers))
    return (f"kvq: CUDA_VISIBLE_DEVICES per xdist worker (from {_source(visible, devices)}): "
            f"{taken}{_shared(workers, devices)}")


def apply_for_xdist_worker(environ: MutableMapping[str, str] = os.environ,
                           count: Callable[[], int] = count_gpus) -> str | None:
    """In pytest-xdist worker gwN of PYTEST_XDIST_WORKER_COUNT (more than one), set
    CUDA_VISIBLE_DEVICES to its device (assign()) and record the original in ORIGINAL_ENV.
    Returns a one-line note, or None when nothing was changed."""
    worker = environ.get("PYTEST_XDIST_WORKER", "")
    try:
        index, workers = int(worker[2:]), int(environ.get("PYTEST_XDIST_WORKER_COUNT", ""))
    except ValueError:  # not an xdist worker
        return None
    if not worker.startswith("gw") or ORIGINAL_ENV in environ:
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    counted = functools.cache(count)  # assign() and the note's _devices() count once
    value = assign(index, workers, visible, counted)
    if value is None:
        return None
    environ[ORIGINAL_ENV] = visible if visible is not None else ""
    environ["CUDA_VISIBLE_DEVICES"] = value
    devices = _devices(visible, counted)
    return (f"kvq: xdist worker {worker} of {workers}: CUDA_VISIBLE_DEVICES={value} "
            f"(of {_source(visible, devices)}){_shared(workers, devices)}")
