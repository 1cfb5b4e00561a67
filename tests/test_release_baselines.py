"""Per-release baseline values: an entry's ``by_release`` ranges (values measured on other
transformers releases than the pinned one), chosen by the installed release."""
from __future__ import annotations

import json

import pytest

from kvcache_repro.core import provenance
from kvcache_repro.verdicts import baseline_file, baseline_update, comparison, release_ranges
from kvcache_repro.verdicts.release_baselines import ranges_for
from kvcache_repro.verdicts.baseline_file import BaselineError, Entry
from kvcache_repro.verdicts.release_ranges import ReleaseValue

PIN = {"versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0"}, "device": "2-core CPU (x86_64)",
       "date": "2026-11-30", "source": "./kvq experiment --update-baselines"}
SEEN = {"versions": {"torch": "2.13.0+cpu", "hqq": "0.2.8.post1"}, "device": "2-core CPU (x86_64)",
        "date": "2026-12-01", "source": "per-release envs"}
KEY = "hqq4/b200/peak_allocated"


def early(ratio=2.038, releases=">=5.0.0,<5.19.0", observed=("5.0.0", "5.17.0")):
    return ReleaseValue(releases, ratio, 0.001, tuple(observed), SEEN)


def pinned(ratio=2.0501, by_release=(), prov=PIN):
    return Entry("hqq4", 200, "peak_allocated", ratio, 0.001, prov, tuple(by_release))


def update(path, *by_release, **pin):
    """Store the pinned entry with ``by_release`` (baseline_update.update): its lines."""
    entries = [pinned(by_release=by_release, **pin)]
    return baseline_update.update(path, entries, run_failed=False, scenario="cpu-tiny")


@pytest.fixture
def path(tmp_path):
    return tmp_path / "cpu-tiny.json"


@pytest.fixture
def stored(path):
    update(path, early())
    return baseline_file.load(path)


def test_round_trip_keeps_ranges(stored, path):
    assert stored.entries[KEY].by_release == (early(),)
    raw = json.loads(path.read_text())["entries"][KEY]["by_release"]
    assert raw == [{"releases": ">=5.0.0,<5.19.0", "ratio": 2.038, "tolerance": 0.001,
                    "observed_on": ["5.0.0", "5.17.0"], "produced_by": SEEN}]


def test_an_entry_without_ranges_keeps_the_old_format(path):
    update(path)
    assert "by_release" not in json.loads(path.read_text())["entries"][KEY]


@pytest.mark.parametrize("release", ["5.0.0", "5.17.0", "5.18.99"])
def test_the_range_holding_the_release_is_used(stored, release):
    v = comparison.compare(stored, "hqq4", 200, "peak_allocated", 2.038, transformers_version=release)
    assert v.passed, v.message
    assert (v.stored, v.tolerance) == (2.038, 0.001)
    # the pin's value is outside that range's band: it fails there
    verdict = comparison.compare(stored, "hqq4", 200, "peak_allocated", 2.0501, transformers_version=release)
    assert verdict.status == "regression"


@pytest.mark.parametrize("release", ["5.19.0", "5.24.0", "5.25.0", "6.1.0", "4.57.6", None, "not-a-version"])
def test_outside_every_range_the_pins_value_is_used(stored, release):
    v = comparison.compare(stored, "hqq4", 200, "peak_allocated", 2.0501, transformers_version=release)
    assert v.passed and v.stored == 2.0501
    verdict = comparison.compare(stored, "hqq4", 200, "peak_allocated", 2.038, transformers_version=release)
    assert verdict.status == "improvement"


def test_the_installed_release_is_the_default(stored, monkeypatch):
    monkeypatch.setattr(provenance.metadata, "version", lambda name: {"transformers": "5.17.0"}[name])
    assert comparison.compare(stored, "hqq4", 200, "peak_allocated", 2.038).passed
    monkeypatch.setattr(provenance.metadata, "version", lambda name: {"transformers": "5.25.0"}[name])
    assert not comparison.compare(stored, "hqq4", 200, "peak_allocated", 2.038).passed


def test_a_miss_names_the_range_and_its_releases(stored):
    msg = comparison.compare(stored, "hqq4", 200, "peak_allocated", 2.05, transformers_version="5.17.0").message
    assert "stored 2.038 +/- 0.001 for transformers >=5.0.0,<5.19.0 (observed on 5.0.0, 5.17.0)" in msg
    assert "regression" in msg
    # the pin's update command would rewrite the pin's value: the range's own recording is named
    assert "release_baselines" in msg and "--update-baselines" not in msg
    pin = comparison.compare(stored, "hqq4", 200, "peak_allocated", 2.038, transformers_version="5.25.0").message
    # the pinned stack it was recorded on, so a run with another quantizer or torch says so
    assert "stored 2.050 +/- 0.001 for transformers 5.24.0 with torch 2.13.0+cpu (the entry's own ratio)" in pin
    assert "--update-baselines" in pin


def test_unmeasured_reports_the_value_for_the_release(stored):
    v = comparison.unmeasured(stored, "hqq4", 200, "peak_allocated", "timed out", transformers_version="5.17.0")
    assert v.stored == 2.038 and ">=5.0.0,<5.19.0" in v.message and not v.passed


def _raw_with(path, by_release, prov=PIN):
    e = pinned(prov=prov).to_json()
    e["by_release"] = by_release
    path.write_text(json.dumps({"scenario": "cpu-tiny", "entries": {KEY: e}}))


GOOD = early().to_json()


@pytest.mark.parametrize("by_release, fragment", [
    ("5.0-5.18", "'by_release' must be a list"),
    ([[1]], "by_release[0] must be an object"),
    ([{k: v for k, v in GOOD.items() if k != "observed_on"}], "missing field(s) observed_on"),
    ([{**GOOD, "releases": "5.0.0-5.18.0"}], "is not of the form \">=LOW,<HIGH\""),
    ([{**GOOD, "releases": ">=5.0.0,<=5.18.0"}], "is not of the form"),
    ([{**GOOD, "releases": ">=5.19.0,<5.0.0"}], "is empty"),
    ([{**GOOD, "releases": ">=five,<5.19.0"}], "Invalid version"),
    ([{**GOOD, "ratio": 0}], "'ratio' must be a finite number > 0"),
    ([{**GOOD, "ratio": True}], "'ratio' must be a finite number > 0"),
    ([{**GOOD, "tolerance": -1}], "'tolerance' must be a finite number >= 0"),
    ([{**GOOD, "observed_on": []}], "'observed_on' must be a non-empty list"),
    ([{**GOOD, "observed_on": ["5.19.0"]}], "observed on 5.19.0, which lies outside its range >=5.0.0,<5.19.0"),
    ([{**GOOD, "observed_on": ["latest"]}], "observed_on holds 'latest', not a version"),
    ([{**GOOD, "produced_by": "me"}], "'produced_by' must be an object"),
    ([GOOD, {**GOOD, "releases": ">=5.10.0,<5.20.0", "observed_on": ["5.19.0"]}],
     "ranges >=5.0.0,<5.19.0 and >=5.10.0,<5.20.0 overlap"),
    ([{**GOOD, "releases": ">=5.0.0,<6.0.0"}], "holds transformers 5.24.0, the release the entry's own ratio"),
])
def test_a_corrupt_range_is_rejected_naming_entry_problem_and_fix(path, by_release, fragment):
    _raw_with(path, by_release)
    with pytest.raises(BaselineError) as exc:
        baseline_file.load(path)
    msg = str(exc.value)
    assert str(path) in msg and repr(KEY) in msg
    assert fragment in msg
    assert ("\">=LOW,<HIGH\"" in msg) or ("narrow/delete that range" in msg)


def test_ranges_are_sorted_on_load(path):
    late = {**GOOD, "releases": ">=5.19.0,<5.20.0", "observed_on": ["5.19.0"], "ratio": 2.07}
    _raw_with(path, [late, GOOD])
    ranges = baseline_file.load(path).entries[KEY].by_release
    assert [rv.releases for rv in ranges] == [">=5.0.0,<5.19.0", ">=5.19.0,<5.20.0"]


def test_update_from_a_run_on_the_pin_keeps_ranges(stored, path):
    lines = update(path, ratio=2.06)
    assert lines == [f"{KEY}: 2.050 -> 2.060 (per-release values kept for >=5.0.0,<5.19.0)"]
    entry = baseline_file.load(path).entries[KEY]
    assert entry.ratio == 2.06 and entry.by_release == (early(),)


def test_update_replaces_a_range_only_when_given_the_same_range(stored, path):
    late = early(ratio=2.07, releases=">=5.19.0,<5.20.0", observed=("5.19.0",))
    update(path, early(ratio=2.04), late)
    assert baseline_file.load(path).entries[KEY].by_release == (early(ratio=2.04), late)


def test_update_refuses_a_range_inside_the_pins_band(path):
    with pytest.raises(BaselineError, match=r"the value 2.050 for >=5.0.0,<5.19.0 lies in the entry's own band"):
        update(path, early(ratio=2.0505))
    assert not path.exists()


def test_update_refuses_a_pin_inside_a_stored_range_and_leaves_the_file(stored, path):
    before = path.read_bytes()
    on_517 = {**PIN, "versions": {**PIN["versions"], "transformers": "5.17.0"}}
    with pytest.raises(BaselineError, match="holds transformers 5.17.0"):
        update(path, ratio=2.038, prov=on_517)
    assert path.read_bytes() == before


def test_drift_compares_with_the_value_for_the_release(stored, path):
    v = comparison.compare(stored, "hqq4", 200, "peak_allocated", 2.038, transformers_version="5.17.0")
    # same torch as the range's provenance, other transformers than the pin: no drift line
    assert comparison.drift_lines(path, [v], {"transformers": "5.17.0", "torch": "2.13.0+cpu"}) == []
    lines = comparison.drift_lines(path, [v], {"transformers": "5.17.0", "torch": "2.14.0"})
    assert lines == [f"{KEY}: stored 2.038, measured 2.038 (+0.0%) [torch 2.13.0+cpu -> 2.14.0]"]


def test_stored_ranges_differ_from_the_pin_and_never_hold_it():
    """Every range in baselines/ is worth keeping: its value lies outside the pin's band
    (a value inside it needs no range), and the pinned release is outside every range."""
    requirements = (baseline_file.BASELINE_DIR.parent / "requirements.txt").read_text().splitlines()
    pin = next(line.split("==")[1].strip() for line in requirements if line.startswith("transformers=="))
    for path in sorted(baseline_file.BASELINE_DIR.glob("*.json")):
        for entry in baseline_file.load(path).entries.values():
            for rv in entry.by_release:
                assert abs(rv.ratio - entry.ratio) > entry.tolerance, (path.name, entry.key, rv.releases)
                assert not release_ranges.in_range(rv.releases, pin), (path.name, entry.key, rv.releases)


def test_ranges_from_measurements_cut_at_the_first_release_showing_each_value():
    measured = {"4.57.6": 2.05201, "5.0.0": 2.05203, "5.4.0": 2.03789, "5.17.0": 2.03791, "5.18.0": 2.04004,
                "5.19.0": 2.0502, "5.24.0": 2.05012}
    found = ranges_for(pinned(), measured, SEEN)
    assert [(rv.releases, rv.ratio, rv.observed_on) for rv in found] == [
        (">=4.57.6,<5.4.0", 2.052, ("4.57.6", "5.0.0")),
        (">=5.4.0,<5.18.0", 2.0379, ("5.4.0", "5.17.0")),
        (">=5.18.0,<5.19.0", 2.04, ("5.18.0",)),  # 5.19.0 lies within the pin's band: no range from there on
    ]
    # the newest measured release differs from the pin, nothing newer measured: bounded by the pin
    assert [rv.releases for rv in ranges_for(pinned(), {"5.17.0": 2.0379}, SEEN)] == [">=5.17.0,<5.24.0"]
    # a release after the pin that differs cannot be given an upper bound: refuse
    with pytest.raises(SystemExit, match="differ from the pin"):
        ranges_for(pinned(), {"5.24.0": 2.0501, "5.25.0": 2.1}, SEEN)


# ---- ranges of other packages (issue 18) ------------------------------------------------

TORCH_SEEN = {"versions": {"torch": "2.11.0+cu130", "transformers": "5.24.0"}, "device": "2-core CPU (x86_64)",
              "date": "2026-12-01", "source": "./kvq compat torch==2.11.0"}


def torch_range(ratio=2.1, releases=">=2.11.0,<2.13.0", observed=("2.11.0",)):
    return ReleaseValue(releases, ratio, 0.001, tuple(observed), TORCH_SEEN, "torch")


def test_a_torch_range_is_chosen_by_the_running_torch_not_transformers(path):
    update(path, early(), torch_range())
    entry = baseline_file.load(path).entries[KEY]
    assert [rv.package for rv in entry.by_release] == ["transformers", "torch"]
    on_pins = {"torch": "2.13.0+cpu"}
    assert entry.value_for("5.24.0", on_pins) is None  # the entry's own ratio
    assert entry.value_for("5.24.0", {"torch": "2.11.0+cu130"}).package == "torch"
    assert entry.value_for("5.17.0", on_pins).package == "transformers"
    assert json.loads(path.read_text())["entries"][KEY]["by_release"][1]["package"] == "torch"
    assert "package" not in json.loads(path.read_text())["entries"][KEY]["by_release"][0]  # format kept


def test_a_torch_range_may_not_hold_the_pinned_torch_nor_overlap_its_own_package(path):
    with pytest.raises(BaselineError, match="holds torch 2.13.0"):
        update(path, torch_range(releases=">=2.11.0,<2.14.0", observed=("2.11.0",)))
    with pytest.raises(BaselineError, match="torch ranges"):
        update(path, torch_range(), torch_range(releases=">=2.12.0,<2.13.0", observed=("2.12.0",)))
    # a transformers range and a torch range with the same numbers are two packages: allowed
    update(path, early(), torch_range())


def test_an_unknown_package_in_a_stored_range_is_rejected(path):
    update(path, torch_range())
    data = json.loads(path.read_text())
    data["entries"][KEY]["by_release"][0]["package"] = "numpy"
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match="unknown package 'numpy'"):
        baseline_file.load(path)


def test_torch_ranges_from_measurements_are_keyed_by_torch():
    entry = pinned(prov={"versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0"}})
    found = ranges_for(entry, {"2.11.0": 2.1, "2.12.1": 2.1, "2.13.0": 2.0501}, TORCH_SEEN, "torch")
    assert [(rv.package, rv.releases, rv.observed_on) for rv in found] == [("torch", ">=2.11.0,<2.13.0",
                                                                           ("2.11.0", "2.12.1"))]


# ---- ./kvq compat --accept: one release's changed value, stored as its release line ----------

ACCEPTED = {"versions": {"transformers": "5.26.0"}, "source": "./kvq compat --accept"}


def _ranges(path):
    return [(rv.package, rv.releases, rv.ratio, rv.observed_on)
            for rv in baseline_file.load(path).entries[KEY].by_release]


def test_accept_stores_the_release_line_and_joins_the_next_release_of_the_same_value(path):
    update(path, early())
    lines = baseline_update.accept(path, {KEY: 2.06}, "transformers", "5.26.0", ACCEPTED)
    assert "[transformers 5.26.0: accepted]" in lines[0]
    assert _ranges(path)[-1] == ("transformers", ">=5.26.0,<5.26.1", 2.06, ("5.26.0",))
    baseline_update.accept(path, {KEY: 2.0604}, "transformers", "5.26.1", ACCEPTED)  # same value within its band
    assert _ranges(path)[-1] == ("transformers", ">=5.26.0,<5.26.2", 2.06, ("5.26.0", "5.26.1"))
    baseline_update.accept(path, {KEY: 2.2}, "transformers", "5.27.0", ACCEPTED)  # another value: its own line
    assert [r[1] for r in _ranges(path)] == [">=5.0.0,<5.19.0", ">=5.26.0,<5.26.2", ">=5.27.0,<5.27.1"]
    entry = baseline_file.load(path).entries[KEY]
    assert entry.ratio == 2.0501 and entry.value_for("5.26.1", {}).ratio == 2.06  # the pin's value stays


def test_accept_refuses_the_pin_a_release_inside_a_stored_range_and_a_missing_entry(path):
    update(path, early())
    before = path.read_text()
    with pytest.raises(BaselineError, match="holds transformers 5.24.0"):
        baseline_update.accept(path, {KEY: 2.1}, "transformers", "5.24.0", ACCEPTED)
    with pytest.raises(BaselineError, match="overlaps the stored range >=5.0.0,<5.19.0"):
        baseline_update.accept(path, {KEY: 2.1}, "transformers", "5.17.0", ACCEPTED)
    update(path, early(releases=">=5.26.0,<5.28.0", observed=("5.26.0", "5.27.0")))
    before = path.read_text()
    with pytest.raises(BaselineError, match="overlaps the stored range >=5.26.0,<5.28.0"):  # starts inside the line
        baseline_update.accept(path, {KEY: 2.1}, "transformers", "5.26.0rc1", ACCEPTED)
    with pytest.raises(BaselineError, match="is missing"):
        baseline_update.accept(path, {"quanto4/b1/peak_allocated": 1.1}, "transformers", "5.26.0", ACCEPTED)
    assert path.read_text() == before  # nothing written by a refusal


@pytest.mark.parametrize("release,line", [("5.25.0", ">=5.25.0,<5.25.1"), ("0.2.8.post1", ">=0.2.8.post1,<0.2.9"),
                                          ("5.26.0rc1", ">=5.26.0rc1,<5.26.1"), ("2.15", ">=2.15,<2.15.1")])
def test_a_release_line_holds_the_release_and_its_post_releases_only(release, line):
    assert baseline_update.release_line(release) == line
    low, high = release_ranges.parse_range(line)
    assert release_ranges.in_range(line, release) and not release_ranges.in_range(line, str(high))


def test_an_accepted_kl_keeps_its_digits_and_passes_on_its_release(path):
    """A KL of 2.6e-4 is stored as measured (4 decimals made it 0.0003, which its own release then failed)."""
    kl = Entry("hqq8", 2, "kl", 0.000230046, 6.91e-06, PIN)
    baseline_update.update(path, [kl], run_failed=False, scenario="accuracy-cpu-core")
    baseline_update.accept(path, {kl.key: 0.000262}, "transformers", "5.26.0", ACCEPTED)
    stored = baseline_file.load(path)
    assert stored.entries[kl.key].value_for("5.26.0", {}).ratio == 0.000262
    assert comparison.compare(stored, "hqq8", 2, "kl", 0.000262, "5.26.0").status == "ok"


@pytest.mark.parametrize("version, inside", [("5.26.0", True), ("5.26.0.post1", True), ("5.26.1rc1", False),
                                             ("5.26.1.dev0", False), ("5.26.1", False), ("5.25.9", False)])
def test_a_range_ends_before_the_pre_releases_of_its_end(version, inside):
    """PEP 440's <5.26.1: a release candidate or a git-main build of 5.26.1 is not 5.26.0's."""
    assert release_ranges.in_range(">=5.26.0,<5.26.1", version) is inside


def test_a_release_candidate_after_a_stored_line_is_its_own_line(path):
    update(path, early())
    baseline_update.accept(path, {KEY: 2.07}, "transformers", "5.26.0", ACCEPTED)
    baseline_update.accept(path, {KEY: 2.09}, "transformers", "5.26.1rc1", ACCEPTED)  # refused as overlapping
    assert _ranges(path)[-2:] == [("transformers", ">=5.26.0,<5.26.1", 2.07, ("5.26.0",)),
                                  ("transformers", ">=5.26.1rc1,<5.26.2", 2.09, ("5.26.1rc1",))]


def test_a_release_candidate_s_line_gives_way_to_its_final(path):
    update(path, early())
    baseline_update.accept(path, {KEY: 2.07}, "transformers", "5.26.0rc1", ACCEPTED)
    assert _ranges(path)[-1] == ("transformers", ">=5.26.0rc1,<5.26.1", 2.07, ("5.26.0rc1",))
    baseline_update.accept(path, {KEY: 2.08}, "transformers", "5.26.0", ACCEPTED)
    assert _ranges(path)[-1] == ("transformers", ">=5.26.0,<5.26.1", 2.08, ("5.26.0",))
    assert len(_ranges(path)) == 2  # the candidate's range is replaced, the early one kept


def test_the_plugin_accepts_each_band_miss_of_its_kinds_and_refuses_a_run_with_another_failure(path, monkeypatch):
    """pytest --kv-accept-release: every kind's band misses (kind.compared) stored for the
    installed release line; a run where any other test failed writes nothing."""
    import types

    from kvcache_repro.plugin import state, summary

    update(path, early())
    miss = comparison.Verdict(KEY, 2.1, 2.0501, 0.001, "regression", str(path))
    kind = types.SimpleNamespace(name="fake", compared=lambda key, result: (path, [miss]))
    monkeypatch.setattr(summary, "KINDS", (kind,))
    monkeypatch.setattr(provenance, "installed", lambda package: "5.26.0")
    lines = []
    config = types.SimpleNamespace(getoption=lambda name: "transformers", stash=pytest.Stash())
    state.results(config, "fake")[("k",)] = object()
    config.stash[state.FAILED] = {"test_ratios_within_baseline_bands", "test_something_else"}
    summary.accept_release(types.SimpleNamespace(write_line=lines.append), config)
    assert "nothing written" in lines[-1] and "test_something_else" in lines[-1]
    assert _ranges(path)[-1][1] == ">=5.0.0,<5.19.0"  # untouched
    config.stash[state.FAILED] = {"test_ratios_within_baseline_bands"}
    summary.accept_release(types.SimpleNamespace(write_line=lines.append), config)
    assert "[transformers 5.26.0: accepted]" in lines[-1]
    assert _ranges(path)[-1] == ("transformers", ">=5.26.0,<5.26.1", 2.1, ("5.26.0",))
