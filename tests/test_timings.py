"""The suite's own timings (core/timings.py): kept per run, printed beside the recorded ones,
recorded only when asked; information only."""
from __future__ import annotations

import json

import pytest

from kvcache_repro.core import timings


def test_a_run_is_printed_beside_the_recorded_one_and_recorded_only_when_asked(tmp_path):
    recorded = tmp_path / "timings.json"
    before = {"test_accuracy": 30.0, "test_cli": 8.0, timings.TOTAL: 100.0}
    assert "nothing recorded for 'tier'" in timings.lines("tier", before, recorded)[0]
    timings.record("tier", before, {"date": "2026-12-07"}, recorded)
    timings.record("experiment cpu", {"none b48": 90.0}, {"date": "2026-12-07"}, recorded)
    now = {"test_accuracy": 60.0, "test_cli": 8.0, "test_new": 1.0, timings.TOTAL: 130.0}
    shown = timings.lines("tier", now, recorded, top=2)
    assert "recorded 2026-12-07" in shown[0]
    assert shown[1].split() == ["test_accuracy", "60.0", "recorded", "30.0", "x2.00"]  # the slowdown, named
    assert shown[2].split() == ["test_cli", "8.0", "recorded", "8.0", "x1.00"]
    assert shown[3].split()[:3] == ["total", "(wall)", "130.0"] and shown[-1] == "  ... 1 more in the run's file"
    assert set(json.loads(recorded.read_text())) == {"tier", "experiment cpu"}  # one entry per what
    run = timings.write_run("tier", now, {"date": "x"}, tmp_path / "runs")
    assert json.loads(run.read_text())["seconds"]["test_accuracy"] == 60.0
    assert json.loads(recorded.read_text())["tier"]["seconds"]["test_accuracy"] == 30.0  # untouched by a run


def test_keeping_timings_never_stops_a_run(tmp_path, monkeypatch):
    """A recorded file of another shape (a list): the run says so and goes on."""
    monkeypatch.setattr(timings, "RECORDED", tmp_path / "timings.json")
    monkeypatch.setattr(timings, "RUNS", tmp_path / "runs")
    timings.RECORDED.write_text("[1, 2]")
    said = timings.keep("tier", {"a": 1.0}, {}, record_them=True)
    assert said[0].startswith("timings of tier not kept: ") and timings.RECORDED.read_text() == "[1, 2]"


def test_a_corrupt_recorded_file_names_itself_and_the_fix(tmp_path):
    recorded = tmp_path / "timings.json"
    recorded.write_text("{not json")
    with pytest.raises(ValueError, match=r"timings.json: not a readable timings file .*git checkout -- .*timings.json"):
        timings.lines("tier", {"a": 1.0}, recorded)
