"""The baseline store: file format, validation, comparison and safe updates."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcache_repro.core import atomic
from kvcache_repro.verdicts import baseline_file, baseline_update, comparison
from kvcache_repro.verdicts.baseline_file import BaselineError, Entry

PROV = {"versions": {"torch": "2.13.0", "transformers": "5.24.0"}, "device": "2-core CPU",
        "settings": {"new_tokens": 64}, "date": "2026-11-29", "source": "./kvq experiment"}


def entry(backend="quanto4", batch=200, metric="peak_rss_growth", ratio=0.64, tolerance=0.1):
    return Entry(backend, batch, metric, ratio, tolerance, PROV)


def raw_file(**entry_overrides):
    e = entry().to_json()
    key = entry_overrides.pop("_key", entry().key)
    e.update(entry_overrides)
    return {"scenario": "cpu", "description": "d", "entries": {key: e}}


@pytest.fixture
def cpu(tmp_path):
    (tmp_path / "baselines").mkdir()
    return tmp_path / "baselines" / "cpu.json"


def test_torch_not_imported_by_module():
    # A fresh interpreter, since other tests in the session may have imported torch.
    code = ("import sys; import kvcache_repro.verdicts.baseline_update, kvcache_repro.verdicts.comparison; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).parents[1]), check=True)
    assert out.stdout.strip() == "False"


def test_entry_key():
    assert baseline_file.entry_key("quanto4", 200, "peak_rss_growth") == "quanto4/b200/peak_rss_growth"
    assert entry().key == "quanto4/b200/peak_rss_growth"


def test_round_trip_and_format(cpu):
    e1, e2 = entry(), entry(backend="hqq2", batch=8, metric="cache_bytes", ratio=0.3, tolerance=0.0)
    baseline_update.update(cpu, [e1, e2], run_failed=False, scenario="cpu", description="two-core box")
    loaded = baseline_file.load(cpu)
    assert loaded.scenario == "cpu"
    assert loaded.description == "two-core box"
    assert loaded.entries == {e1.key: e1, e2.key: e2}
    text = cpu.read_text()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_missing_file_is_empty(tmp_path):
    b = baseline_file.load(tmp_path / "gpu-small.json")
    assert (b.scenario, b.description, b.entries) == ("gpu-small", "", {})


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "top level must be an object"),
    ('{"entries": {}}', "'scenario'"),
    ('{"scenario": "cpu", "entries": []}', "'entries' must be a dict"),
    ('{"scenario": "cpu", "entries": {"a": {}, "a": {}}}', "key 'a' appears twice"),  # json.loads keeps the last
])
def test_corrupt_or_wrong_shape_names_file_and_fix(cpu, content, fragment):
    cpu.write_text(content)
    with pytest.raises(BaselineError) as exc:
        baseline_file.load(cpu)
    msg = str(exc.value)
    assert str(cpu) in msg
    assert fragment in msg
    assert f"git checkout -- {cpu}" in msg
    assert "./kvq experiment --update-baselines" in msg


@pytest.mark.parametrize("overrides, fragment", [
    ({"metric": "peak_vram"}, "unknown metric 'peak_vram'"),
    ({"tolerance": -0.1}, "'tolerance'"),
    ({"ratio": 0}, "'ratio'"),
    ({"ratio": float("nan")}, "'ratio'"),
    ({"ratio": "0.6"}, "'ratio'"),
    ({"ratio": 10 ** 400}, "'ratio'"),  # an integer past float's range
    ({"metric": []}, "unknown metric []"),
    ({"batch": 100}, "does not match its fields"),
    ({"_key": "quanto4/b200/cache_bytes"}, "does not match its fields"),
])
def test_bad_entry_names_file_and_entry(cpu, overrides, fragment):
    data = raw_file(**overrides)
    cpu.write_text(json.dumps(data))
    with pytest.raises(BaselineError) as exc:
        baseline_file.load(cpu)
    msg = str(exc.value)
    assert str(cpu) in msg
    assert repr(next(iter(data["entries"]))) in msg
    assert fragment in msg


def test_missing_entry_field(cpu):
    data = raw_file()
    del data["entries"][entry().key]["produced_by"]
    cpu.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match="missing field.*produced_by"):
        baseline_file.load(cpu)


@pytest.fixture
def stored(cpu):
    baseline_update.update(cpu, [entry(ratio=0.64, tolerance=0.1)], run_failed=False, scenario="cpu")
    return baseline_file.load(cpu)


@pytest.mark.parametrize("measured", [0.54, 0.64, 0.74])
def test_compare_ok_inside_band_including_edges(stored, measured):
    v = comparison.compare(stored, "quanto4", 200, "peak_rss_growth", measured)
    assert v.status == "ok" and v.passed
    assert (v.stored, v.tolerance) == (0.64, 0.1)


@pytest.mark.parametrize("measured, status", [(0.74 + 1e-6, "regression"),
                                               (0.54 - 1e-6, "improvement")])
def test_compare_just_outside_edges(stored, measured, status):
    assert comparison.compare(stored, "quanto4", 200, "peak_rss_growth", measured).status == status


def test_compare_regression_above(stored):
    v = comparison.compare(stored, "quanto4", 200, "peak_rss_growth", 0.75)
    assert v.status == "regression" and not v.passed


def test_compare_improvement_below(stored):
    v = comparison.compare(stored, "quanto4", 200, "peak_rss_growth", 0.53)
    assert v.status == "improvement" and not v.passed


def test_compare_missing_entry(stored):
    v = comparison.compare(stored, "quanto4", 8, "peak_rss_growth", 0.5)
    assert v.status == "missing" and not v.passed
    assert (v.stored, v.tolerance) == (None, None)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_measurement_fails_as_a_finding_not_a_crash(stored, value):
    """NaN compares false both ways (it would pass as an "improvement"): it fails its own verdict,
    tagged [behaviour], and the others are still compared (issue 18: a crash before)."""
    v = comparison.compare(stored, "quanto4", 200, "peak_rss_growth", value)
    assert v.status == "nonfinite" and not v.passed
    assert v.message.startswith("[behaviour] quanto4/b200/peak_rss_growth") and "not compared" in v.message
    assert "not a finite number" in v.message and v.stored is not None
    assert comparison.problems([v, comparison.compare(stored, "quanto4", 200, "peak_rss_growth", 0.64)]) == [v.message]
    with pytest.raises(ValueError, match="must be a number"):
        comparison.compare(stored, "quanto4", 200, "peak_rss_growth", "0.5")


def test_messages(stored, cpu):
    reg = comparison.compare(stored, "quanto4", 200, "peak_rss_growth", 0.812).message
    imp = comparison.compare(stored, "quanto4", 200, "peak_rss_growth", 0.321).message
    miss = comparison.compare(stored, "hqq2", 200, "peak_rss_growth", 0.5).message
    for msg in (reg, imp, miss):
        assert "\n" not in msg
        assert "./kvq experiment --update-baselines" in msg
        assert "--kv-update-baselines" in msg
    for msg, measured in ((reg, "0.812"), (imp, "0.321")):
        assert measured in msg and "0.640" in msg and "0.100" in msg
    assert "regression: uses more memory than the baseline" in reg
    assert "improvement: uses less memory than the baseline - update the baseline if intended" in imp
    assert "hqq2/b200/peak_rss_growth" in miss
    assert "no stored entry" in miss and str(cpu) in miss


def test_update_replaces_only_given_entries(cpu):
    keep = entry(backend="hqq4", ratio=0.5, tolerance=0.05)
    old = entry(ratio=0.7)
    baseline_update.update(cpu, [keep, old], run_failed=False, scenario="cpu", description="keep me")
    keep_before = json.loads(cpu.read_text())["entries"][keep.key]

    new = entry(ratio=0.64)
    added = entry(metric="cache_bytes", ratio=0.25)
    lines = baseline_update.update(cpu, [new, added], run_failed=False, scenario="cpu")

    assert lines == ["quanto4/b200/peak_rss_growth: 0.700 -> 0.640",
                     "quanto4/b200/cache_bytes: new -> 0.250"]
    data = json.loads(cpu.read_text())
    assert data["entries"][keep.key] == keep_before
    assert data["description"] == "keep me"
    loaded = baseline_file.load(cpu)
    assert loaded.entries == {keep.key: keep, new.key: new, added.key: added}


def test_update_keeps_a_stored_tolerance_unless_told_to_reset_it(cpu):
    baseline_update.update(cpu, [entry(ratio=0.7, tolerance=0.02)], run_failed=False, scenario="cpu")
    lines = baseline_update.update(cpu, [entry(ratio=0.64, tolerance=0.3)], run_failed=False, scenario="cpu")
    assert lines == ["quanto4/b200/peak_rss_growth: 0.700 -> 0.640"]
    assert baseline_file.load(cpu).entries[entry().key].tolerance == 0.02
    lines = baseline_update.update(cpu, [entry(ratio=0.64, tolerance=0.3)], run_failed=False, scenario="cpu",
                                   reset_tolerance=True)
    assert lines == ["quanto4/b200/peak_rss_growth: 0.640 -> 0.640 (tolerance 0.020 -> 0.300)"]
    assert baseline_file.load(cpu).entries[entry().key].tolerance == 0.3


def test_a_missing_entry_is_a_problem_that_names_the_recording_command(stored):
    ok = comparison.compare(stored, "quanto4", 200, "peak_rss_growth", 0.64)
    missing = comparison.compare(stored, "hqq4", 200, "peak_rss_growth", 0.5)
    assert comparison.problems([ok]) == []
    (message,) = comparison.problems([ok, missing])
    assert "no stored entry" in message and "--update-baselines" in message


def assert_refused(cpu, entries, match=None, error=BaselineError, run_failed=False, scenario="cpu"):
    """``update`` raises ``error`` and leaves the file as it was, byte for byte."""
    before = cpu.read_bytes()
    with pytest.raises(error, match=match):
        baseline_update.update(cpu, entries, run_failed=run_failed, scenario=scenario)
    assert cpu.read_bytes() == before


def test_update_refuses_failed_run_and_leaves_file(stored, cpu):
    assert_refused(cpu, [entry(ratio=0.9)], "failed run", run_failed=True)


@pytest.mark.parametrize("entries", [[], [entry(ratio=float("inf"))], [entry(ratio=-1.0)],
                                     [entry(), entry(ratio=0.5)]])
def test_update_refuses_bad_entries_and_leaves_file(stored, cpu, entries):
    assert_refused(cpu, entries)


def test_update_refuses_to_overwrite_corrupt_file(cpu):
    cpu.write_text('{"scenario": "cpu", "entries": {"x": ')
    assert_refused(cpu, [entry()], "not valid JSON")


def test_update_refuses_other_scenarios_file(stored, cpu):
    assert_refused(cpu, [entry()], "scenario 'cpu'", scenario="gpu-small")


def test_update_leaves_no_temp_files(cpu):
    baseline_update.update(cpu, [entry()], run_failed=False, scenario="cpu")
    baseline_update.update(cpu, [entry(ratio=0.6)], run_failed=False, scenario="cpu")
    assert sorted(p.name for p in cpu.parent.iterdir()) == ["cpu.json"]


def test_failed_write_keeps_old_file_and_no_temp(stored, cpu, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    assert_refused(cpu, [entry(ratio=0.6)], "disk full", error=OSError)
    assert sorted(p.name for p in cpu.parent.iterdir()) == ["cpu.json"]


def test_direction_follows_the_metric(tmp_path):
    """Above the band is a regression for memory, KL and time, an improvement for top-1."""
    stored = baseline_file.BaselineFile(tmp_path / "a.json", "accuracy", "", {
        e.key: e for e in (
            baseline_file.Entry("hqq4", 2, "top1_agreement", 0.9, 0.02, {}),
            baseline_file.Entry("hqq4", 2, "kl", 0.01, 0.002, {}),
            baseline_file.Entry("hqq4", 1, "decode_time_ratio", 1.5, 0.3, {}),
        )})
    up = comparison.compare(stored, "hqq4", 2, "top1_agreement", 0.95)
    down = comparison.compare(stored, "hqq4", 2, "top1_agreement", 0.85)
    assert (up.status, down.status) == ("improvement", "regression")
    assert "is less accurate" in down.message and "is more accurate" in up.message
    assert comparison.compare(stored, "hqq4", 2, "kl", 0.02).status == "regression"
    slow = comparison.compare(stored, "hqq4", 1, "decode_time_ratio", 2.0)
    assert slow.status == "regression" and "is slower" in slow.message


def test_drift_lists_entries_recorded_with_other_versions(tmp_path):
    path = tmp_path / "cpu.json"
    old = {"versions": {"transformers": "4.57.6", "torch": "2.13.0"}}
    same = {"versions": {"transformers": "5.24.0", "torch": "2.13.0"}}
    baseline_update.update(path, [Entry("hqq4", 200, "cache_bytes", 0.35, 0.001, old),
                                  Entry("quanto4", 200, "cache_bytes", 0.35, 0.001, same)], run_failed=False, scenario="cpu")
    stored = baseline_file.load(path)
    verdicts = [comparison.compare(stored, b, 200, "cache_bytes", 0.357) for b in ("hqq4", "quanto4")]
    lines = comparison.drift_lines(path, verdicts, {"transformers": "5.24.0", "torch": "2.13.0"})
    assert lines == ["hqq4/b200/cache_bytes: stored 0.35, measured 0.357 (+2.0%) [transformers 4.57.6 -> 5.24.0]"]
