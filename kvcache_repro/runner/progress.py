"""Progress of an experiment, one line per event, with an estimate of the time left.

Lines, not a redrawn bar: the same output reads on a terminal and in a CI log (a tqdm
bar in a non-tty log is a stream of carriage returns). Each line says which (backend,
batch) runs, how many rows are done, the time elapsed and the time left; a row that runs
long prints a line every ``every`` seconds with its time limit, so a log never goes
silent for minutes.

The estimate: each remaining row costs the mean wall time of the finished rows of its
batch (rows of one batch cost about the same; batches differ by orders of magnitude);
for a batch with no finished row yet, the mean of all finished rows, and the line says
the estimate is rough. Rows stored by an earlier run (--resume) count with their times.
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

    def remaining(self) -> list[tuple[str, int]]:
        return [r for r in self.rows if r not in self.walls and r != self.current]

    def eta(self) -> tuple[float | None, bool]:
        """(seconds left after the current row, whether every row had a same-batch estimate)."""
        if not self.walls:
            return None, False
        overall = sum(self.walls.values()) / len(self.walls)
        total, exact = 0.0, True
        for backend, batch in self.remaining():
            same = [w for (b, n), w in self.walls.items() if n == batch]
            if same:
                total += sum(same) / len(same)
            else:
                total += overall
                exact = False
        return total, exact

    def _left(self, running_for: float = 0.0) -> str:
        eta, exact = self.eta()
        if eta is None:
            return "time left unknown until a row finishes"
        if self.current is not None:
            same = [w for (b, n), w in self.walls.items() if n == self.current[1]] or list(self.walls.values())
            exact = exact and any(n == self.current[1] for _, n in self.walls)
            eta += max(0.0, sum(same) / len(same) - running_for)
        return f"~{_fmt(eta)} left" + ("" if exact else " (rough: a batch size not timed yet)")

    def _head(self) -> str:
        return f"[{len(self.walls)}/{len(self.rows)} done, {_fmt(self.clock() - self.start)} elapsed]"

    def begin(self, backend: str, batch: int, limit: float | None = None) -> None:
        self.current = (backend, batch)
        self.row_start = self.clock()
        self._last_beat = self.row_start
        limit_note = f", time limit {_fmt(limit)}" if limit else ""
        self.log(f"{self._head()} {backend} b{batch}: started{limit_note}; {self._left()}")

    def beat(self) -> None:
        """Called while the row runs; prints at most every ``every`` seconds."""
        now = self.clock()
        if self.current is None or now - self._last_beat < self.every:
            return
        self._last_beat = now
        backend, batch = self.current
        self.log(f"{self._head()} {backend} b{batch}: running for {_fmt(now - self.row_start)}; "
                 f"{self._left(now - self.row_start)}")

    def end(self, backend: str, batch: int, outcome: str) -> float:
        wall = self.clock() - self.row_start
        self.walls[(backend, batch)] = wall
        self.current = None
        self.log(f"{self._head()} {backend} b{batch}: {outcome} ({_fmt(wall)}); {self._left()}")
        return wall
