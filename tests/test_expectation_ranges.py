"""The expectation table's range lookup and its two failure messages (pure, fast)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvcache_repro.verdicts import expectations as ex

A = ex.VersionRange("5.0.0", "5.8.0")
B = ex.VersionRange("5.8.0", "6.0.0")
TABLE = ex.Behaviour("DEMO", ((ex.V457, {"x": ex.Expectation("old", "4.57.6")}),
                              (A, {"x": ex.Expectation("rejected", "5.0.0, 5.5.4")}),
                              (B, {"x": ex.Expectation("quantizes", "5.8.0, 5.24.0", "#1", wrong=True)})))


@pytest.mark.parametrize("version,value", [("4.57.6", "old"), ("5.0.0", "rejected"), ("5.7.99", "rejected"),
                                           ("5.8.0", "quantizes"), ("5.99.0", "quantizes")])
def test_lookup_picks_the_range_holding_the_release(version, value):
    assert TABLE.lookup("x", version).value == value


def test_a_newer_5x_release_falls_in_the_last_range_without_an_edit():
    assert TABLE.range_of("5.31.2") == B
    for behaviour in ex.BEHAVIOURS:
        behaviour.entry("5.99.0")  # every table covers all of 5.x


@pytest.mark.parametrize("version", ["4.46.3", "6.0.0", "4.58.0"])
def test_outside_the_supported_ranges_is_unsupported(version):
    with pytest.raises(ex.UnsupportedVersion, match=rf"transformers {version} is not supported"):
        TABLE.lookup("x", version)


def test_ranges_of_every_behaviour_do_not_overlap():
    for behaviour in ex.BEHAVIOURS:
        spans = sorted((ex.Version(r.low), ex.Version(r.high)) for r, _ in behaviour.ranges)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:])), behaviour.name


def test_every_entry_says_where_it_was_observed():
    for behaviour in ex._REVIEWED:  # the reviewed tables (an accepted split carries the other keys over)
        for rng, value in behaviour.ranges:
            for key, entry in (value.items() if isinstance(value, dict) else [(None, value)]):
                assert entry.observed, f"{behaviour.name}[{key}] for {rng} has no observation"
                assert all(rng.contains(v.strip()) for v in entry.observed.split(",")), (behaviour.name, key, rng)


def test_behaviour_message_names_release_range_entry_expectation_and_observation():
    message = ex.differs(TABLE, "x", "ran, 2 of 2 layers quantized", version="5.3.0")
    assert message.startswith("[behaviour] transformers 5.3.0 behaves differently from the table for >=5.0.0,<5.8.0")
    assert "DEMO[x] expects 'rejected' (observed on 5.0.0, 5.5.4)" in message
    assert "observed here: ran, 2 of 2 layers quantized" in message


def test_a_behaviour_of_another_package_is_keyed_by_that_package_s_release(monkeypatch):
    """A torch range is checked against the running torch (its build tag dropped), whatever
    transformers release is asked about; its message names torch."""
    installed = {"torch": "2.11.0+cu130", "transformers": "5.24.0", "optimum-quanto": "0.2.7", "hqq": "0.2.8.post1"}
    monkeypatch.setattr("importlib.metadata.version", lambda name: installed[name])
    old_torch, new_torch = ex.VersionRange("2.0.0", "2.12.0", "torch"), ex.VersionRange("2.12.0", "3.0.0", "torch")
    table = ex.Behaviour("TORCH_DEMO", ((old_torch, ex.Expectation("nan", "2.11.0")),
                                        (new_torch, ex.Expectation("finite", "2.13.0, 2.14.1"))))
    assert table.lookup(None, "5.24.0").value == "nan" and table.range_of("4.57.6") == old_torch
    message = ex.differs(table, None, "finite", version="5.24.0")
    assert message.startswith("[behaviour] torch 2.11.0 behaves differently from the table for >=2.0.0,<2.12.0 of torch")
    assert "observed here: finite (with transformers 5.24.0, optimum-quanto 0.2.7, hqq 0.2.8.post1)" in message
    installed["torch"] = "2.14.1"
    assert table.lookup(None, "5.24.0").value == "finite"


def test_harness_message_is_tagged_and_names_what_is_missing():
    message = ex.harness_gap("DbrxConfig has no attn_config", version="5.5.4")
    assert message == "[harness] the harness cannot drive transformers 5.5.4: DbrxConfig has no attn_config"


PROBES = sorted((Path(__file__).parent.parent / "compat" / "probes").glob("*.json"))
PINNED_BUGS = {"cache_config_untouched": ex.CACHE_CONFIG_UNTOUCHED, "beam_reorder": ex.BEAM_SEARCH_MATCHES}


@pytest.mark.parametrize("probe_file", PROBES, ids=[p.stem for p in PROBES])
def test_the_table_agrees_with_every_recorded_probe(probe_file):
    """The ranges were found by measurement: every recorded probe (compat/probes/, from
    `./kvq compat --probe`) must say what the table says for its release. Probe values
    from a harness gap (``harness: ...``) check nothing."""
    probe = json.loads(probe_file.read_text())
    version = probe["transformers"]
    for key, observed in probe.items():
        if key.startswith("family:"):
            family = key.split(":", 1)[1]
            entry = ex.family_support(family, version)
            if observed.startswith("harness:"):
                continue
            expected = entry.probe or re.escape(entry.value)
            assert re.fullmatch(expected, observed), (version, family, entry, observed)
        elif key in PINNED_BUGS:
            wrong = PINNED_BUGS[key].lookup(version=version).wrong
            assert observed.startswith("no" if wrong else "yes"), (version, observed)


# ---- a release's changed value, accepted (./kvq compat --accept) -------------------------------

def _accepted(value="quantizes", release="5.26.0", key="x"):
    return ex.Accepted("DEMO", key, "transformers", release, value, {"source": "test"})


def test_an_accepted_value_splits_its_range_at_that_release_and_leaves_the_rest():
    table = ex.amend(TABLE, _accepted("rejected"))
    assert [str(r) for r, _ in table.ranges] == [">=4.57.0,<4.58.0", ">=5.0.0,<5.8.0", ">=5.8.0,<5.26.0",
                                                 ">=5.26.0,<6.0.0"]
    assert table.lookup("x", "5.25.0").value == "quantizes" and table.lookup("x", "5.25.0").wrong
    assert table.lookup("x", "5.26.0") == ex.Expectation("rejected", "5.26.0")  # observed there, not wrong
    with pytest.raises(ValueError, match="DEMO has no key 'y'"):
        ex.amend(TABLE, _accepted(key="y"))
    with pytest.raises(ValueError, match="no range of DEMO holds transformers 7.0.0"):
        ex.amend(TABLE, _accepted(release="7.0.0"))
    with pytest.raises(ValueError, match=r"holds 'quantizes', observed on 5.24.0, at or above transformers 5.20.0"):
        ex.amend(TABLE, _accepted("rejected", "5.20.0"))  # 5.24.0 showed the old value: bisect instead


def test_accepted_values_are_stored_only_when_all_apply_and_a_corrupt_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "expectations.json"
    monkeypatch.setattr(ex, "_REVIEWED", (*ex._REVIEWED, TABLE))
    assert ex.accept([_accepted("rejected")], path) == ["DEMO[x]: 'rejected' from transformers 5.26.0 on"]
    assert ex.amended(ex.load_accepted(path))["DEMO"].lookup("x", "5.30.0").value == "rejected"
    before = path.read_text()
    with pytest.raises(ValueError, match="no range of DEMO holds"):
        ex.accept([_accepted(release="7.0.0")], path)
    with pytest.raises(ValueError, match="unknown behaviour 'NOPE'"):
        ex.accept([ex.Accepted("NOPE", None, "transformers", "5.26.0", "x", {})], path)
    with pytest.raises(ValueError, match=r"'maybe' is no value of its table \(old, quantizes, rejected\)"):
        ex.check_accepted([_accepted("maybe")])
    assert path.read_text() == before  # a refusal writes nothing
    path.write_text('{"accepted": [{"behaviour": "DEMO"}]}')
    with pytest.raises(ValueError, match=r"expectations.json is not a list of accepted expectations .*"
                                         r"git checkout baselines/expectations.json"):
        ex.load_accepted(path)


def test_what_a_stored_failure_asks_to_accept_is_read_back_from_its_message():
    miss = ex.differs(TABLE, "x", "ran, 0 of 2 layers quantized", version="5.26.0", value="rejected")
    assert "expects 'quantizes' (observed on 5.8.0, 5.24.0), found 'rejected';" in miss
    got = ex.accepted_from_message("AssertionError: " + miss[:600], {}, {})
    assert (got.behaviour, got.key, got.package, got.release, got.value) == ("DEMO", "x", "transformers", "5.26.0",
                                                                             "rejected")
    assert ex.accepted_from_message(ex.differs(TABLE, "x", "crashed", version="5.26.0"), {}, {}) is None
    fixed = "[XPASS(strict)] " + ex.pinned_reason(ex.CACHE_CONFIG_UNTOUCHED, None, ex.CACHE_CONFIG_UNTOUCHED.lookup(
        version="5.10.4"))
    got = ex.accepted_from_message(fixed, {"transformers": "5.10.4"}, {})
    assert (got.behaviour, got.release, got.value) == ("CACHE_CONFIG_UNTOUCHED", "5.10.4", "yes")
    assert not ex.amend(ex.CACHE_CONFIG_UNTOUCHED, got).lookup(version="5.10.4").wrong  # the fix is the new normal
