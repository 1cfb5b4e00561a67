"""One measurement per test session, whichever xdist worker asks first.

`./kvq test` runs two xdist workers; the session-wide measurements (a memory scenario, an
accuracy table) are cached per process, and their tests are grouped to one worker
(each measured kind's xdist_group, plugin/kinds.py) - but xdist's loadgroup scheduling still sent a test of
the accuracy group to the other worker, which then computed the 55 s table a second
time (measured 2026-12-02: two 55-57 s setups of ``table``), and cpu-deep's scenario ran
in two workers (80 s and 44 s). Here the first worker to ask computes under a file lock
in the session's shared temporary directory and stores the result; the others wait for
the lock and load it. What is shared is deterministic on one machine (exact bytes,
teacher-forced metrics); speed is not shared this way (the controller measures it alone).

A computation that raises (a skip, a missing model) stores nothing: the next asker
computes and raises the same way. A result that cannot be pickled is returned unshared.
"""
from __future__ import annotations

import fcntl
import hashlib
import pickle
from pathlib import Path


def once(shared_dir: Path | None, key: str, compute):
    """``compute()``, or what another worker of this session stored under ``key``;
    ``shared_dir`` None (one process, no xdist): plain ``compute()``."""
    if shared_dir is None:
        return compute()
    shared_dir.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = shared_dir / f"{name}.pickle"
    with open(shared_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here instead of measuring again
        if path.exists():
            return pickle.loads(path.read_bytes())
        value = compute()
        try:
            data = pickle.dumps(value)
        except (pickle.PicklingError, TypeError, AttributeError):
            return value
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return value


def session_dir(config, tmp_path_factory) -> Path | None:
    """The directory every xdist worker of this session shares (the parent of each
    worker's basetemp); None outside xdist."""
    if not hasattr(config, "workerinput"):
        return None
    return Path(tmp_path_factory.getbasetemp()).parent / "kvq-shared-results"
