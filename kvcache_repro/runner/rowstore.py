"""The rows of an experiment as they finish, in ``OUTDIR/rows.json``, for ``--resume``.

Each finished row (a measurement or a failure) rewrites the whole file through a temp
file and a rename, so an interrupt (Ctrl-C, SIGTERM, a CI timeout, a kill -9) at any
moment leaves either the previous file or the new one, never half of one. The file
names the setup it belongs to (``fingerprint``: the scenario's every setting, the
checkpoint, the package versions); ``--resume`` refuses rows from another setup rather
than mixing them into one table.

Resuming keeps the measured rows and measures the rest: rows never run, and rows that
failed (out of memory, over the time limit, an error), which are tried again - a
failure is an outcome worth reporting, not a result worth keeping.
"""
from __future__ import annotations

import json
from pathlib import Path

from kvcache_repro.core.atomic import write_atomic
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.runner.outcomes import RowFailure

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
            stored_fingerprint, rows = data["fingerprint"], data["rows"]
        except (ValueError, KeyError, TypeError) as error:
            raise ResumeError(f"{self.path}: not a rows file this suite wrote ({error}); "
                              f"rerun without --resume to measure every row") from None
        if stored_fingerprint != self.fingerprint:
            differ = sorted(k for k in set(stored_fingerprint) | set(self.fingerprint)
                            if stored_fingerprint.get(k) != self.fingerprint.get(k))
            raise ResumeError(f"{self.path}: rows from another setup ({', '.join(differ)} differ); rerun "
                              f"without --resume to measure every row, or pass another --output-dir")
        kept = [row for row in rows if row["status"] == "measured"]
        self.rows = {(r["measurement"]["backend"], r["measurement"]["batch"]): r for r in kept}
        return [Measurement.from_dict(r["measurement"]) for r in kept]

    def walls(self) -> dict[tuple[str, int], float]:
        return {key: row["wall_seconds"] for key, row in self.rows.items() if row.get("wall_seconds") is not None}

    def add_measurement(self, m: Measurement, wall: float | None) -> None:
        self.rows[(m.backend, m.batch)] = {"status": "measured", "measurement": m.to_dict(), "wall_seconds": wall}
        self._save()

    def add_failure(self, f: RowFailure, wall: float | None) -> None:
        self.rows[(f.backend, f.batch)] = {"status": "failed", "failure": f.to_dict(), "wall_seconds": wall}
        self._save()

    def _save(self) -> None:
        write_atomic(self.path, json.dumps({"fingerprint": self.fingerprint, "rows": list(self.rows.values())},
                                           indent=1) + "\n")
