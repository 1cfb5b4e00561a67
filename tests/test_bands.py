"""Bands cut from the spread between machines: stored with it, checked against it on load,
never narrowed by one machine's update, not banded where too wide to catch anything."""
from __future__ import annotations

import json

import pytest

from kvcache_repro.verdicts import bands, baseline_file, baseline_update, comparison
from kvcache_repro.verdicts.baseline_file import BaselineError, Entry, Spread

MACHINE_A = {"cpu": "AMD EPYC (avx2)", "torch_capability": "AVX2", "threads": 1, "env": {}}
MACHINE_B = {"cpu": "Intel Xeon (avx512f)", "torch_capability": "AVX512", "threads": 1, "env": {}}
VERSIONS = {"torch": "2.13.0", "transformers": "5.24.0"}


def prov(machine=MACHINE_A, versions=VERSIONS):
    return {"versions": dict(versions), "machine": machine, "date": "2026-12-01",
            "settings": {"protocol": "rows2-prefill64-decode128-G128-R64"}}


def spread_entry(observed, margin=2.0, floor=0.0, banded=True, metric="perplexity_ratio"):
    centre, tol = bands.band(observed, margin, floor)
    return Entry("hqq2", 2, metric, centre, tol, prov(), (), Spread(observed, margin, floor, banded, "n"))


def stored_file(tmp_path, e, edit=None):
    """``e`` in a baseline file; ``edit(raw entry)`` changes its JSON first."""
    path = tmp_path / "acc.json"
    data = json.loads(baseline_file.dumps(baseline_file.BaselineFile(path, "accuracy", "d", {e.key: e})))
    if edit:
        edit(data["entries"][e.key])
    path.write_text(json.dumps(data))
    return path


def test_band_holds_every_observed_value_with_its_margin():
    observed = {"a": 9.399, "b": 9.468, "c": 9.41}
    centre, tol = bands.band(observed, 2.0, 0.0)
    assert centre == pytest.approx(9.4335)
    assert tol >= 2 * (9.468 - 9.399) / 2 - 1e-9  # margin x half the range
    assert all(centre - tol <= v <= centre + tol for v in observed.values())
    assert bands.band({"a": 1.0}, 2.0, 0.01) == (1.0, 0.01)  # no spread: the floor


@pytest.mark.parametrize("x", [0.0197, 0.00781, 1.23456, 0.000123401])
def test_round_up_never_narrows(x):
    assert x <= bands.round_up(x) <= x * 1.01


def test_spread_round_trips_through_the_file(tmp_path):
    e = spread_entry({"AMD AVX2 1t": 9.399, "Intel AVX512 1t": 9.468})
    back = baseline_file.load(stored_file(tmp_path, e)).entries[e.key]
    assert back == e


def test_a_band_narrower_than_its_spread_is_a_corrupt_file(tmp_path):
    e = spread_entry({"a": 9.399, "b": 9.468})
    path = stored_file(tmp_path, e, lambda raw: raw.update(tolerance=0.01))  # a cut to one machine's noise
    with pytest.raises(BaselineError, match="does not hold the spread"):
        baseline_file.load(path)


@pytest.mark.parametrize("field, value", [("margin", 0.5), ("observed", {}), ("observed", {"a": "x"}),
                                          ("floor", -1), ("banded", "yes")])
def test_malformed_spreads_are_rejected_with_the_fix(tmp_path, field, value):
    e = spread_entry({"a": 1.0, "b": 1.01})
    path = stored_file(tmp_path, e, lambda raw: raw["spread"].update({field: value}))
    with pytest.raises(BaselineError, match="kvcache_repro.runner.spread"):
        baseline_file.load(path)


def test_a_value_from_another_machine_inside_the_spread_passes(tmp_path):
    """Issue 17: hqq2's perplexity ratio 9.468 on an AVX512 machine against 9.399 +/- 0.019 cut
    on one machine. With both in the spread it passes; a regression beyond the margin fails."""
    e = spread_entry({"a": 9.399, "b": 9.468})
    stored = baseline_file.load(stored_file(tmp_path, e))
    assert comparison.compare(stored, "hqq2", 2, "perplexity_ratio", 9.468).passed
    assert comparison.compare(stored, "hqq2", 2, "perplexity_ratio", 9.399).passed
    miss = comparison.compare(stored, "hqq2", 2, "perplexity_ratio", 9.60)
    assert miss.status == "regression" and "band cut from the spread 9.399..9.468 on 2" in miss.message


def test_an_unbanded_metric_is_reported_not_compared(tmp_path):
    e = spread_entry({"a": 40.0, "b": 55.0}, banded=False)
    v = comparison.compare(baseline_file.load(stored_file(tmp_path, e)), "hqq2", 2, "perplexity_ratio", 80.0)
    assert v.status == "reported" and v.passed and "not banded" in v.message


def test_update_on_one_machine_keeps_the_stored_spread(tmp_path):
    """--update-baselines on machine A (one end of the spread) keeps B's stored value inside."""
    e = spread_entry({"A old": 9.399, "B": 9.468})
    path = stored_file(tmp_path, e)
    baseline_update.update(path, [Entry("hqq2", 2, "perplexity_ratio", 9.40, 0.0188, prov())], run_failed=False,
                           scenario="accuracy")
    back = baseline_file.load(path).entries[e.key]
    assert back.tolerance >= e.tolerance
    assert back.ratio - back.tolerance <= 9.468 <= back.ratio + back.tolerance
    assert bands.machine_label(prov()) in back.spread.observed and "B" in back.spread.observed


def test_update_on_new_versions_restarts_the_observations_but_keeps_the_width(tmp_path):
    e = spread_entry({"A old": 9.399, "B": 9.468})
    path = stored_file(tmp_path, e)
    newer = prov(versions={**VERSIONS, "torch": "2.14.1"})
    baseline_update.update(path, [Entry("hqq2", 2, "perplexity_ratio", 9.1, 0.0188, newer)], run_failed=False,
                           scenario="accuracy")
    back = baseline_file.load(path).entries[e.key]
    assert list(back.spread.observed.values()) == [9.1]
    assert (back.ratio, back.tolerance) == (9.1, e.tolerance)


def run(machine, values):
    return {"machine": machine, "values": values}


def test_rebanding_adds_the_runs_to_the_recording_machines_value():
    entry = Entry("hqq2", 2, "top1_agreement", 0.367188, 0.00781, prov())
    observed = bands.observed_for("accuracy-core", entry, {
        "B": run(MACHINE_B, {"accuracy-core/hqq2/top1_agreement": 0.375})})
    new = bands.rebanded(entry, observed)
    assert set(new.spread.observed) == {bands.machine_label(prov()), "B"}
    # half-range 0.0039 x 2 = 0.0078 < the 2-position floor 2/256: the floor rules
    assert new.tolerance == pytest.approx(bands.round_up(max(2 / 256, 0.375 - new.ratio)), rel=1e-3)
    assert new.spread.banded and "positions" in new.spread.note


@pytest.mark.parametrize("metric", ["kl", "logit_error", "peak_allocated"])
def test_a_value_of_zero_on_every_run_is_banded_without_dividing_by_it(metric):
    """A KL clamped to 0.0 on every path: a band of the metric's floor, its note says so."""
    entry = Entry("hqq8", 1, metric, 0.0, 0.0, prov())
    new = bands.rebanded(entry, {"m1 AVX2 1t": 0.0, "m2 AVX512 1t": 0.0})
    assert new.ratio == 0.0 and "(the value is 0)" in new.spread.note


@pytest.mark.parametrize("label, capability", [("AMD EPYC (avx2) AVX2 1t [X=1] (core)", "AVX2"),
                                               ("Intel Xeon AVX512 ?t", "AVX512"), ("unrecorded machine, ?", "")])
def test_the_capability_is_read_from_a_machine_label(label, capability):
    assert bands.capability_of(label) == capability


def test_a_spread_wider_than_what_a_regression_moves_is_not_banded():
    """A band wider than half of what the cache adds (ratio - 1) would catch nothing."""
    entry = Entry("hqq2", 2, "perplexity_ratio", 9.4, 0.0188, prov())
    new = bands.rebanded(entry, {"B": 20.0})
    assert not new.spread.banded and "not banded" in new.spread.note
    tight = bands.rebanded(entry, {"B": 9.468})
    assert tight.spread.banded and "perplexity off by more than" in tight.spread.note


def test_each_path_runs_with_its_own_knobs_and_none_inherited(tmp_path, monkeypatch):
    """A knob left in the caller's environment must not leak into the "own" path (the spread
    would measure one path twice)."""
    from kvcache_repro.runner import spread

    seen = {}

    def fake_call(cmd, env, timeout):
        seen[cmd[cmd.index("measure") + 1].rsplit("/", 1)[-1]] = {k: env.get(k) for k in spread.KNOBS}
        return 0
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("KVQ_TORCH_THREADS", "2")
    monkeypatch.setattr(spread.subprocess, "call", fake_call)
    spread.run_paths(tmp_path, ["own", "aten-default", "mkl-sse42"], ["memory"])
    assert seen["own.json"] == dict.fromkeys(spread.KNOBS)
    assert seen["aten-default.json"] == {**dict.fromkeys(spread.KNOBS), "ATEN_CPU_CAPABILITY": "default"}
    assert seen["mkl-sse42.json"] == {**dict.fromkeys(spread.KNOBS), "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def test_apply_stores_the_spread_and_a_second_apply_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(baseline_file, "BASELINE_DIR", tmp_path)
    name = "acc.json"
    e = Entry("hqq2", 2, "perplexity_ratio", 9.39915, 0.0188, prov())
    stored = baseline_file.BaselineFile(tmp_path / name, "accuracy", "d", {e.key: e})
    (tmp_path / name).write_text(baseline_file.dumps(stored))
    runs = {"B": run(MACHINE_B, {"acc/hqq2/perplexity_ratio": 9.468}),
            "A-default": run(MACHINE_A, {"acc/hqq2/perplexity_ratio": 9.43326})}
    bands.apply(runs, write=True, files={name: "acc"})
    first = (tmp_path / name).read_text()
    stored = baseline_file.load(tmp_path / name).entries[e.key]
    assert set(stored.spread.observed) == {bands.machine_label(prov()), "B", "A-default"}
    assert stored.ratio - stored.tolerance <= 9.39915 and 9.468 <= stored.ratio + stored.tolerance
    bands.apply(runs, write=True, files={name: "acc"})
    assert (tmp_path / name).read_text() == first


def test_runs_of_one_machine_and_path_measured_apart_are_one_run(tmp_path):
    """The slow tables are measured apart (same machine and path): both files' values count."""
    for name, values in (("core", {"accuracy-core/hqq4/kl": 0.06}), ("slow", {"accuracy-seed/hqq4/kl": 0.19})):
        (tmp_path / f"{name}.json").write_text(json.dumps(run(MACHINE_A, values)))
    runs = bands.load_runs(sorted(tmp_path.glob("*.json")))
    assert list(runs) == [bands.machine_label({"machine": MACHINE_A})]
    assert runs[bands.machine_label({"machine": MACHINE_A})]["values"] == {"accuracy-core/hqq4/kl": 0.06,
                                                                           "accuracy-seed/hqq4/kl": 0.19}


def test_reset_tolerances_recuts_from_the_spread_and_keeps_it(tmp_path):
    """--reset-tolerances must not throw the stored spread away for one machine's floor."""
    e = spread_entry({"A old": 9.399, "B": 9.468})
    path = stored_file(tmp_path, e)
    baseline_update.update(path, [Entry("hqq2", 2, "perplexity_ratio", 9.40, 0.0188, prov())], run_failed=False,
                           scenario="accuracy", reset_tolerance=True)
    back = baseline_file.load(path).entries[e.key]
    assert "B" in back.spread.observed
    assert back.ratio - back.tolerance <= 9.399 and 9.468 <= back.ratio + back.tolerance


def test_the_loose_speed_bound_is_cut_from_the_runs_of_the_same_cpu_capability(tmp_path, monkeypatch):
    """verdicts/speed.ceilings: LOOSE x the slowest stored run of the machine's capability; a
    capability with no run gets the slowest of all (the loosest); the label's capability is read
    back as machine_label writes it."""
    from kvcache_repro.measure.speed import SPEED_SETUPS
    from kvcache_repro.verdicts import speed as speed_verdicts

    a = bands.machine_label({"machine": MACHINE_A})
    b = bands.machine_label({"machine": {**MACHINE_B, "env": {"ONEDNN_MAX_CPU_ISA": "SSE41"}}})
    default = bands.machine_label({"machine": {**MACHINE_A, "torch_capability": "DEFAULT",
                                               "env": {"ATEN_CPU_CAPABILITY": "default"}}})
    assert [bands.capability_of(x) for x in (a, b, default, a + " (one core kept busy)")] == [
        "AVX2", "AVX512", "DEFAULT", "AVX2"]
    observed = {a: 1.40, a + " (loaded)": 1.45, b: 1.30, default: 1.70}
    e = Entry("quanto4", 16, speed_verdicts.BOUNDED, 1.5, 0.3, prov(), (),
              Spread(observed, 2.0, 0.2, False, "not banded"))
    path = tmp_path / "speed.json"
    path.write_text(baseline_file.dumps(baseline_file.BaselineFile(path, "speed-cpu-tiny", "d", {e.key: e})))
    monkeypatch.setattr(speed_verdicts, "baseline_path", lambda setup: path)
    tiny = SPEED_SETUPS["tiny"]
    assert speed_verdicts.ceilings(tiny, "AVX2")["quanto4"][0] == pytest.approx(speed_verdicts.LOOSE * 1.45)
    assert speed_verdicts.ceilings(tiny, "AVX512")["quanto4"][0] == pytest.approx(speed_verdicts.LOOSE * 1.30)
    bound, basis = speed_verdicts.ceilings(tiny, "NEON")["quanto4"]
    assert bound == pytest.approx(speed_verdicts.LOOSE * 1.70) and "none on NEON" in basis
