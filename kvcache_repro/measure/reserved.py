"""What a CUDA run's reserved memory is, read from the caching allocator's own counters.

``torch.cuda.memory_reserved`` is what the caching allocator holds from the driver:
live tensors (``memory_allocated``), plus freed blocks it keeps cached for reuse, plus
the rounding of every block (requests above 1 MiB round up to 2 MiB multiples, small
ones share 2 / 20 MiB segments; c10/cuda/CUDACachingAllocator.cpp). A cache that grows
by one token a step asks for a slightly larger block for every K/V tensor of every
layer; the old blocks stay cached, so reserved climbs far above the live peak until a
``cudaMalloc`` fails. Then the allocator frees every cached block and retries
(``num_alloc_retries`` counts these) - reserved drops, and climbs again: a saw-tooth
at the card's capacity. A reading taken on that saw-tooth ("reserved after generate",
the seed's 55.99 GB) depends on the card's capacity and on where the last retry fell,
not only on the run. With ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` the
allocator maps pages into one growing segment instead, and reserved stays close to
allocated. Torch-free at import (the report reads these from stored measurements).
"""
from __future__ import annotations

GIB = 2**30

# Metric names a CUDA Measurement carries beside the compared ones (memory.CudaProbe).
ALLOC_RETRIES = "alloc_retries"  # memory_stats()["num_alloc_retries"] during generate
OOMS = "ooms"  # memory_stats()["num_ooms"]: out-of-memory errors raised (and caught) inside
DEVICE_FREE_AFTER = "device_free_after"  # torch.cuda.mem_get_info(): free device memory, bytes
DEVICE_TOTAL = "device_total"  # ... and the device's total
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
    """One line on a CUDA row's reserved memory: how much of it is cached-but-free and
    rounding above the live peak, and whether it is a saw-tooth reading."""
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
