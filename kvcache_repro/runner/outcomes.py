"""A (backend, batch) that produced no measurement, and why: out of memory, over its
time limit, or an error. It is a row of the result like a measurement, so a run that
loses one row still reports the others, and the baseline comparison can name the
entries it could not measure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 2**30
KINDS = ("oom", "timeout", "error")


@dataclass(frozen=True)
class RowFailure:
    scenario: str
    backend: str
    batch: int
    kind: str  # one of KINDS
    message: str  # one line, for the table
    output_tail: str = ""  # the worker's last output lines
    free_bytes: int | None = None  # device memory free when the OOM was caught

    @property
    def key(self) -> str:
        return f"{self.backend}/b{self.batch}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RowFailure":
        return cls(**data)


def free_memory(device: str) -> tuple[int | None, int | None]:
    """(free, total) bytes of the device: CUDA from the driver, CPU MemAvailable."""
    if device == "cuda":
        import torch

        try:
            free, total = torch.cuda.mem_get_info()
            return int(free), int(total)
        except RuntimeError:
            return None, None
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None


def oom(scenario: str, backend: str, batch: int, device: str, error: BaseException) -> RowFailure:
    """The row for an out-of-memory error, with what the device had free after it
    (the failed run's tensors are released by then: what a smaller batch could use)."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    free, total = free_memory(device)
    where = "this device" if device == "cpu" else "this device (cuda)"
    room = "free memory unknown" if free is None else f"{free / GIB:.2f} GiB free of {total / GIB:.2f} GiB"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RowFailure(scenario, backend, batch, "oom", f"OOM at batch {batch} on {where}, {room} ({first[:160]})",
                      free_bytes=free)
