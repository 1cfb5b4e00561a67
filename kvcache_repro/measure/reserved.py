"""What a CUDA run's reserved memory is, from the caching allocator's own counters.
Torch-free at import (the report reads these from stored measurements).

Reserved = live tensors + freed blocks kept cached + every block's rounding. A cache
growing a token a step asks for a slightly larger block for every K/V tensor; the old
ones stay cached, so reserved climbs until a ``cudaMalloc`` fails, the allocator frees
its cache and retries (``num_alloc_retries``), and it climbs again: a saw-tooth at the
card's capacity. A reading on it (the seed's 55.99 GB "reserved after generate") depends
on the card, not only the run. ``expandable_segments:True`` keeps reserved near allocated:
one segment per pool that maps pages as it grows, so reserved is the peak of live bytes,
the holes freed blocks leave inside the segment, and less than a page.

The allocator is an axis of every CUDA result: the comparison runs under expandable
segments unless the environment names a configuration (``worker_env``); each measurement
records ``allocator_config()``, and a reserved reading is compared only with a baseline
taken under the same one (comparison.py).
"""
from __future__ import annotations

import math
import os

GIB, MIB = 2**30, 2**20

# Metric names a CUDA Measurement carries beside the compared ones (memory.CudaProbe):
# memory_stats()'s num_alloc_retries and num_ooms during generate, mem_get_info()'s bytes.
ALLOC_RETRIES, OOMS = "alloc_retries", "ooms"
DEVICE_FREE_AFTER, DEVICE_TOTAL = "device_free_after", "device_total"

# ---- the allocator's configuration ----------------------------------------------------
CONF_ENVS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the second is torch's newer name
EXPANDABLE = "expandable_segments:True"
DEFAULT = "default"


def allocator_config(environ=None) -> str:
    """The caching allocator's configuration as the environment sets it, normalized:
    "expandable_segments:True", "default", or the options sorted ("expandable_segments:False"
    is the default). Torch reads PYTORCH_ALLOC_CONF where set (2.9 on), else the older name."""
    environ = os.environ if environ is None else environ
    options = {}
    raw = environ.get(CONF_ENVS[1]) or environ.get(CONF_ENVS[0], "")
    for part in raw.replace(" ", "").split(","):
        if ":" in part:
            key, value = part.split(":", 1)
            options[key] = value
    if options.get("expandable_segments", "").lower() != "true":
        options.pop("expandable_segments", None)
    else:
        options["expandable_segments"] = "True"
    return ",".join(f"{k}:{v}" for k, v in sorted(options.items())) or DEFAULT


def run_allocator(device: str, measurements) -> str:
    """The allocator configuration a run's rows (Measurements) recorded; CPU: glibc's heap."""
    found = sorted({m.allocator for m in measurements if m.allocator})
    return " | ".join(found) if found else "glibc default" if device == "cpu" else "not recorded"


def worker_env(device: str, environ=None) -> dict[str, str]:
    """What a measuring worker adds to its environment: on CUDA expandable segments, unless
    the environment already configures the allocator (``PYTORCH_CUDA_ALLOC_CONF=
    expandable_segments:False`` for the default one, the seed's own reading)."""
    environ = os.environ if environ is None else environ
    if device != "cuda" or any(environ.get(k) for k in CONF_ENVS):
        return {}
    return {CONF_ENVS[0]: EXPANDABLE}


# ---- peak reserved under expandable segments, from peak allocated ----------------------
# c10/cuda/CUDACachingAllocator.cpp (docs/gpu.md): with expandable segments each stream has
# one segment per pool that maps physical pages as it grows (20 MiB pages for the large pool,
# requests > 1 MiB; 2 MiB for the small pool) and unmaps nothing until empty_cache(). So peak
# reserved = peak allocated + free holes inside the segment at that moment + less than a page
# of each pool. The holes are measured by replaying a CPU run's allocation sequence through
# those rules (replay, below; runner/gpu_prediction.py): a share of what generate allocated.
# HOLES_SHARE bounds a row no replay was made for (your model): the largest share the plan's
# replays gave, 0.91 (seed-arch-short's unquantized run at batch 1; at batch 200 0.15-0.40),
# rounded up; gpu-tiny's KB-sized runs, all page, are left out of it (docs/gpu.md).
LARGE_PAGE, SMALL_PAGE = 20 * MIB, 2 * MIB
HOLES_SHARE = 1.0
# The dry run's fake counter (measure.memory): peak allocated in the allocator's 512-byte
# blocks; its MiB-sized runs would all be one 20 MiB page.
BLOCK = 512


def round_up(n: float, unit: int) -> int:
    return int(math.ceil(n / unit) * unit)


def reserved_range(peak_allocated: float, before: float, device: str = "cuda",
                   holes_share: float = HOLES_SHARE) -> tuple[int, int]:
    """(lowest, highest) peak reserved under expandable segments for a run whose live bytes
    peak at ``peak_allocated``, ``before`` of them allocated before generate (weights and
    inputs, laid out once, no holes). Lowest: no holes, every byte in whole pages (2 MiB, the
    smaller); highest: ``holes_share`` of the rest as holes and less than a page of each pool
    mapped beyond. ``device`` "cpu": the dry run's fake counter (blocks, no holes)."""
    if device != "cuda":
        return round_up(peak_allocated, BLOCK), round_up(peak_allocated, BLOCK)
    holes = holes_share * max(peak_allocated - before, 0)
    return round_up(peak_allocated, SMALL_PAGE), round_up(peak_allocated + holes + LARGE_PAGE + SMALL_PAGE, SMALL_PAGE)


def simulated_counters(peak_allocated: int) -> dict[str, int]:
    """The dry run's CUDA counters on the CPU: what expandable segments reserve for a live peak
    with no holes, in 512-byte blocks."""
    return {"peak_reserved": reserved_range(peak_allocated, peak_allocated, "cpu")[0]}


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


# ---- expandable segments, replayed -------------------------------------------------------
# The caching allocator's rules with expandable_segments:True (c10/cuda/CUDACachingAllocator.cpp,
# docs/gpu.md), enough to replay an allocation sequence: sizes round up to 512 B; up to 1 MiB
# goes to the small pool, larger to the large one; each pool is one segment that maps pages
# (2 MiB / 20 MiB) at its end; a request takes the smallest free block that fits (lowest
# address first), passing over the segment's free tail when an inner block fits too (the
# tail's "expandable size" counts the unmapped space after it: get_free_block); what remains
# is split off when >= 512 B (should_split, either pool, with expandable segments); with no
# fit the segment maps pages at its end, joining its free tail; a freed block merges with
# free neighbours and stays mapped. Scratch memory inside one kernel and other streams are not in it.
SMALL_SIZE = 1 * MIB


class _Pool:
    def __init__(self, page: int):
        self.page = page
        self.blocks: list[list] = []  # [address, size, free] in address order
        self.mapped = 0

    def alloc(self, size: int) -> int:
        fits = [b for b in self.blocks if b[2] and b[1] >= size]
        if not fits:
            tail = self.blocks[-1] if self.blocks and self.blocks[-1][2] else None
            grow = round_up(size - (tail[1] if tail else 0), self.page)
            if tail:
                tail[1] += grow
            else:
                self.blocks.append([self.mapped, grow, True])
            self.mapped += grow
            fits = [self.blocks[-1]]
        fits.sort(key=lambda b: (b[1], b[0]))
        block = fits[1] if len(fits) > 1 and fits[0] is self.blocks[-1] else fits[0]
        i = self.blocks.index(block)
        if block[1] - size >= BLOCK:
            self.blocks.insert(i + 1, [block[0] + size, block[1] - size, True])
            block[1] = size
        block[2] = False
        return block[0]

    def free(self, address: int) -> None:
        i = next(k for k, b in enumerate(self.blocks) if b[0] == address)
        self.blocks[i][2] = True
        if i + 1 < len(self.blocks) and self.blocks[i + 1][2]:
            self.blocks[i][1] += self.blocks.pop(i + 1)[1]
        if i > 0 and self.blocks[i - 1][2]:
            self.blocks[i - 1][1] += self.blocks.pop(i)[1]


def replay(trace, scale: float = 1.0, before: int = 0) -> tuple[int, int]:
    """(peak allocated, peak reserved) of ``trace`` (peak.PeakTracker's: (key, bytes) created,
    (key, 0) freed) under expandable segments, every size times ``scale``; ``before`` bytes
    (weights, inputs) laid out first and kept."""
    small, large = _Pool(SMALL_PAGE), _Pool(LARGE_PAGE)
    live, peak, where = 0, 0, {}
    if before:
        large.alloc(round_up(before, BLOCK))
        live = peak = round_up(before, BLOCK)
    for key, size in trace:
        if size:
            size = round_up(size * scale, BLOCK)
            pool = small if size <= SMALL_SIZE else large
            where[key] = (pool, pool.alloc(size), size)
            live += size
            peak = max(peak, live)
        elif key in where:
            pool, address, size = where.pop(key)
            pool.free(address)
            live -= size
    return peak, small.mapped + large.mapped
