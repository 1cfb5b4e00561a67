"""Progress of an experiment, one line per event (a CI log reads like the terminal), a row
that runs long every ``every`` seconds. Time left: each remaining row costs the mean of the
finished rows of its batch (batches differ by orders of magnitude), or "rough", of all.
"""
from __future__ import annotations

import time


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, rows: list[tuple[str, int]], done: dict[tuple[str, int], float] | None = None,
                 log=print, clock=time.monotonic, every: float = 30.0):
        self.rows = list(rows)
        self.walls: dict[tuple[str, int], float] = dict(done or {})
        self.log, self.clock, self.every = log, clock, every
        self.start = clock()
        self.current: tuple[str, int] | None = None

    def _left(self, running_for: float = 0.0) -> str:
        if not self.walls:
            return "time left unknown until a row finishes"
        eta, exact = 0.0, True
        for row in (r for r in self.rows if r not in self.walls):
            same = [w for (_, n), w in self.walls.items() if n == row[1]]
            exact = exact and bool(same)
            mean = sum(same or self.walls.values()) / len(same or self.walls)
            eta += max(0.0, mean - running_for) if row == self.current else mean
        return f"~{_fmt(eta)} left" + ("" if exact else " (rough: a batch size not timed yet)")

    def _say(self, backend: str, batch: int, what: str, running_for: float = 0.0) -> None:
        self.log(f"[{len(self.walls)}/{len(self.rows)} done, {_fmt(self.clock() - self.start)} elapsed] "
                 f"{backend} b{batch}: {what}; {self._left(running_for)}")

    def begin(self, backend: str, batch: int, limit: float | None = None) -> None:
        self.current = (backend, batch)
        self.row_start = self.clock()
        self._last_beat = self.row_start
        self._say(backend, batch, "started" + (f", time limit {_fmt(limit)}" if limit else ""))

    def beat(self) -> None:
        """Called while the row runs; prints at most every ``every`` seconds."""
        now = self.clock()
        if self.current is None or now - self._last_beat < self.every:
            return
        self._last_beat = now
        self._say(*self.current, f"running for {_fmt(now - self.row_start)}", now - self.row_start)

    def end(self, backend: str, batch: int, outcome: str) -> float:
        wall = self.clock() - self.row_start
        self.walls[(backend, batch)] = wall
        self.current = None
        self._say(backend, batch, f"{outcome} ({_fmt(wall)})")
        return wall
