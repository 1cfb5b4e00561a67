"""kvcache_repro/runner/shared_results.py: a session-wide measurement computed once across
xdist workers. Two worker processes are simulated by two calls (and a child process),
sharing one directory."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kvcache_repro.runner import shared_results


def test_the_second_asker_loads_what_the_first_computed(tmp_path):
    calls = []
    first = shared_results.once(tmp_path, "accuracy cpu core", lambda: calls.append(1) or {"kl": 0.06})
    second = shared_results.once(tmp_path, "accuracy cpu core", lambda: calls.append(2) or {"kl": 9.9})
    assert first == second == {"kl": 0.06} and calls == [1]
    assert shared_results.once(tmp_path, "accuracy cpu full", lambda: "other") == "other"  # another key


def test_another_process_of_the_session_gets_the_stored_value(tmp_path):
    shared_results.once(tmp_path, "experiment cpu-deep", lambda: [1, 2, 3])
    code = ("import sys; from pathlib import Path; from kvcache_repro.runner import shared_results as s; "
            "print(s.once(Path(sys.argv[1]), 'experiment cpu-deep', lambda: 'measured again'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[1, 2, 3]"


def test_a_failed_computation_stores_nothing_and_outside_xdist_nothing_is_shared(tmp_path):
    def fails():
        raise RuntimeError("model not available")

    with pytest.raises(RuntimeError):
        shared_results.once(tmp_path, "k", fails)
    assert shared_results.once(tmp_path, "k", lambda: "computed") == "computed"
    assert shared_results.once(None, "k", lambda: "not shared") == "not shared"
    unpicklable = lambda: None  # noqa: E731
    assert shared_results.once(tmp_path, "fn", lambda: unpicklable) is unpicklable
