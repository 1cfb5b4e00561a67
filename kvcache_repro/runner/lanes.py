"""Rows of an experiment a few at a time: one lane per core for a CPU scenario's workers, each
pinned to one thread (exact bytes do not depend on what runs beside them); one lane on CUDA
(peaks and times of a shared card would mix) and in process. Dearest rows first, so that the
lanes end together; an interrupt, or a row that ends the run, stops the running rows (their
wait loops call ``beat``, which raises) and starts no queued one."""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading


ROW_BYTES = 3 * 2**30  # the most a CPU row's worker held (cpu's hqq4 at 48 rows: 2.4 GiB RSS) and more


def default_lanes(scenario, in_process: bool = False) -> int:
    """One per core, as many as the memory available holds (ROW_BYTES each), at least one."""
    if in_process or scenario.device != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        fits = int(info["MemAvailable"].split()[0]) * 1024 // ROW_BYTES
    except (OSError, KeyError, ValueError):
        fits = cores
    return max(1, min(cores, fits))


def longest_first(scenario, rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """By batch x tokens, then the quantized backends (they decode slower) before none."""
    rank = {b: i for i, b in enumerate(scenario.backends)}
    return sorted(rows, key=lambda r: (-r[1] * scenario.tokens(r[1]), -rank[r[0]]))


class Stop(KeyboardInterrupt):
    """Raised by ``Lanes.beat`` once the run is stopping: the worker is stopped as on Ctrl-C."""


class Lanes:
    def __init__(self, lanes: int, progress=None):
        self.lanes, self.progress, self.stopping = max(1, lanes), progress, threading.Event()

    def beat(self) -> None:
        """Called in each row's wait loop."""
        if self.stopping.is_set():
            raise Stop()
        if self.progress:
            self.progress.beat()

    def run(self, row, rows: list[tuple[str, int]]) -> None:
        """``row(backend, batch)`` for each of ``rows``; the first exception stops the rest and is raised."""
        if self.lanes == 1:
            for r in rows:
                row(*r)
            return
        futures = []
        with concurrent.futures.ThreadPoolExecutor(self.lanes, thread_name_prefix="kvq-lane") as pool:
            try:
                futures += [pool.submit(row, *r) for r in rows]
                pending = set(futures)
                while pending:  # a short timeout: the main thread stays open to signals
                    finished, pending = concurrent.futures.wait(pending, 1.0, concurrent.futures.FIRST_EXCEPTION)
                    for f in finished:
                        if f.exception() is not None:
                            raise f.exception()
            except BaseException:
                self.stopping.set()
                for f in futures:
                    f.cancel()
                with _signals_held():  # a second Ctrl-C must not leave lanes writing behind the caller
                    concurrent.futures.wait(futures)
                raise


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM ignored while the lanes wind down (seconds: each worker's grace)."""
    main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
