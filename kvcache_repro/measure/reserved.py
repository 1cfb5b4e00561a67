"""What a CUDA run's reserved memory is, from the caching allocator's own counters.
Torch-free at import (the report reads these from stored measurements).

Reserved = live tensors + freed blocks kept cached + every block's rounding. A cache
growing a token a step asks for a slightly larger block for every K/V tensor; the old
ones stay cached, so reserved climbs until a ``cudaMalloc`` fails, the allocator frees
its cache and retries (``num_alloc_retries``), and it climbs again: a saw-tooth at the
card's capacity. A reading on it (the seed's 55.99 GB "reserved after generate") depends
on the card, not only the run. ``expandable_segments:True`` keeps reserved near allocated.
"""
from __future__ import annotations

GIB = 2**30

# Metric names a CUDA Measurement carries beside the compared ones (memory.CudaProbe):
# memory_stats()'s num_alloc_retries and num_ooms during generate, mem_get_info()'s bytes.
ALLOC_RETRIES, OOMS = "alloc_retries", "ooms"
DEVICE_FREE_AFTER, DEVICE_TOTAL = "device_free_after", "device_total"
EXPANDABLE_NOTE = "allocator: expandable_segments:True"


def allocator_counters(stats: dict, free_total: tuple[int, int] | None) -> dict[str, int]:
    """The counters of ``torch.cuda.memory_stats()`` and ``mem_get_info()`` a report needs."""
    out = {ALLOC_RETRIES: int(stats.get("num_alloc_retries", 0)), OOMS: int(stats.get("num_ooms", 0))}
    if free_total is not None:
        out[DEVICE_FREE_AFTER], out[DEVICE_TOTAL] = int(free_total[0]), int(free_total[1])
    return out


def is_saw_tooth(metrics: dict) -> bool:
    """The allocator hit the device's capacity and emptied its cache at least once."""
    return metrics.get(ALLOC_RETRIES, 0) > 0


def explain(metrics: dict) -> str:
    """One line on a CUDA row's reserved memory: cached-but-free blocks and rounding above the
    live peak, and whether it is a saw-tooth reading."""
    if "peak_reserved" not in metrics or "peak_allocated" not in metrics:
        return ""
    reserved, live = metrics["peak_reserved"], metrics["peak_allocated"]
    after = metrics.get("reserved_after")
    text = (f"peak reserved {reserved / GIB:.2f} GiB = live peak {live / GIB:.2f} GiB + "
            f"{(reserved - live) / GIB:.2f} GiB cached free blocks and block rounding")
    if after is not None:
        text += f"; reserved after generate {after / GIB:.2f} GiB"
    if DEVICE_TOTAL in metrics:
        text += f" of {metrics[DEVICE_TOTAL] / GIB:.1f} GiB on the device"
    if is_saw_tooth(metrics):
        text += (f"; SAW-TOOTH: {metrics[ALLOC_RETRIES]} allocation retries (cudaMalloc failed, the allocator "
                 f"freed its cache and retried): reserved memory was at the device's capacity, so a reserved "
                 f"reading measures the card as much as the run - compare peak allocated")
    if metrics.get(OOMS, 0):
        text += f"; {metrics[OOMS]} out-of-memory errors inside the run"
    return text
