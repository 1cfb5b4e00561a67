"""One measurement per test session, whichever xdist worker asks first: xdist still sends
tests of one group to two workers, which measured twice (the 55 s accuracy table). The
first asker computes under a file lock in the session's shared directory and stores the
result (deterministic on one machine; speed is never shared); the others wait and load it.
"""
from __future__ import annotations

import fcntl
import hashlib
import pickle
from pathlib import Path


def once(shared_dir: Path | None, key: str, compute):
    """``compute()``, or what another worker stored under ``key`` (``shared_dir`` None: no
    xdist). A computation that raises stores nothing; an unpicklable result is not shared."""
    if shared_dir is None:
        return compute()
    shared_dir.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = shared_dir / f"{name}.pickle"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here instead of measuring again
        if path.exists():
            return pickle.loads(path.read_bytes())
        value = compute()
        try:
            path.with_suffix(".tmp").write_bytes(pickle.dumps(value))
        except (pickle.PicklingError, TypeError, AttributeError):
            return value
        path.with_suffix(".tmp").replace(path)
        return value


def session_dir(config, tmp_path_factory) -> Path | None:
    """The directory every xdist worker of this session shares; None outside xdist."""
    if not hasattr(config, "workerinput"):
        return None
    return Path(tmp_path_factory.getbasetemp()).parent / "kvq-shared-results"
