"""The rows of an experiment as they finish, in ``OUTDIR/rows.json``, for ``--resume``.

Each finished row rewrites the file atomically: an interrupt at any moment leaves the old
file or the new one. The file names its setup (``fingerprint``), and ``--resume`` refuses
rows of another; it keeps the measured rows and measures the rest, failed rows included.
"""
from __future__ import annotations

import json
from pathlib import Path

from kvcache_repro.core.atomic import write_atomic
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.runner.worker import RowFailure

FILE = "rows.json"


class ResumeError(RuntimeError):
    pass


class RowStore:
    def __init__(self, directory: Path, fingerprint: dict):
        self.path = Path(directory) / FILE
        self.fingerprint = fingerprint
        self.rows: dict[tuple[str, int], dict] = {}

    def resume(self) -> list[Measurement]:
        """Load the measured rows of an earlier run of the same setup (none if no file)."""
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            stored, rows = data["fingerprint"], data["rows"]
        except (ValueError, KeyError, TypeError) as error:
            raise ResumeError(f"{self.path}: not a rows file this suite wrote ({error}); "
                              f"rerun without --resume to measure every row") from None
        if stored != self.fingerprint:
            differ = sorted(k for k in set(stored) | set(self.fingerprint)
                            if stored.get(k) != self.fingerprint.get(k))
            raise ResumeError(f"{self.path}: rows from another setup ({', '.join(differ)} differ); rerun "
                              f"without --resume to measure every row, or pass another --output-dir")
        kept = [row for row in rows if row["status"] == "measured"]
        self.rows = {(r["measurement"]["backend"], r["measurement"]["batch"]): r for r in kept}
        return [Measurement.from_dict(r["measurement"]) for r in kept]

    def walls(self) -> dict[tuple[str, int], float]:
        return {key: row["wall_seconds"] for key, row in self.rows.items()
                if row.get("wall_seconds") is not None}

    def add(self, row: Measurement | RowFailure, wall: float | None) -> None:
        """Store a finished row (replacing an earlier one of its key) and rewrite the file."""
        measured = isinstance(row, Measurement)
        self.rows[(row.backend, row.batch)] = {"status": "measured" if measured else "failed",
                                               "measurement" if measured else "failure": row.to_dict(),
                                               "wall_seconds": wall}
        data = {"fingerprint": self.fingerprint, "rows": list(self.rows.values())}
        write_atomic(self.path, json.dumps(data, indent=1) + "\n")
