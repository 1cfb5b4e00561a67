"""Progress of an experiment, one line per event (a CI log reads like the terminal), each row
that runs long every ``every`` seconds. Time left: each remaining row costs the mean of the
finished rows of its batch (batches differ by orders of magnitude), or "rough", of all; with
``lanes`` rows at once, that sum over the lanes. Thread-safe: rows of several lanes report here.
"""
from __future__ import annotations

import threading
import time


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, rows: list[tuple[str, int]], done: dict[tuple[str, int], float] | None = None,
                 log=print, clock=time.monotonic, every: float = 30.0, lanes: int = 1):
        self.rows = list(rows)
        self.walls: dict[tuple[str, int], float] = dict(done or {})
        self.log, self.clock, self.every, self.lanes = log, clock, every, max(1, lanes)
        self.start = clock()
        self.running: dict[tuple[str, int], list[float]] = {}  # row -> [started, last beat]
        self._lock = threading.RLock()

    def _left(self) -> str:
        if not self.walls:
            return "time left unknown until a row finishes"
        eta, exact, now = 0.0, True, self.clock()
        for row in (r for r in self.rows if r not in self.walls):
            same = [w for (_, n), w in self.walls.items() if n == row[1]]
            exact = exact and bool(same)
            mean = sum(same or self.walls.values()) / len(same or self.walls)
            eta += max(0.0, mean - (now - self.running[row][0])) if row in self.running else mean
        return f"~{_fmt(eta / self.lanes)} left" + ("" if exact else " (rough: a batch size not timed yet)")

    def _say(self, backend: str, batch: int, what: str) -> None:
        self.log(f"[{len(self.walls)}/{len(self.rows)} done, {_fmt(self.clock() - self.start)} elapsed] "
                 f"{backend} b{batch}: {what}; {self._left()}")

    def begin(self, backend: str, batch: int, limit: float | None = None) -> None:
        with self._lock:
            now = self.clock()
            self.running[(backend, batch)] = [now, now]
            self._say(backend, batch, "started" + (f", time limit {_fmt(limit)}" if limit else ""))

    def beat(self) -> None:
        """Called while rows run; says each at most every ``every`` seconds."""
        with self._lock:
            now = self.clock()
            for (backend, batch), times in list(self.running.items()):
                if now - times[1] >= self.every:
                    times[1] = now
                    self._say(backend, batch, f"running for {_fmt(now - times[0])}")

    def end(self, backend: str, batch: int, outcome: str) -> float:
        with self._lock:
            wall = self.clock() - self.running.pop((backend, batch))[0]
            self.walls[(backend, batch)] = wall
            self._say(backend, batch, f"{outcome} ({_fmt(wall)})")
            return wall
