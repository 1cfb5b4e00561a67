"""The claim functions (kvcache_repro/verdicts/claims.py) decide both ways and say "not
distinguishable" inside the spread, on synthetic measurements: a claim test can fail."""
from __future__ import annotations

import json

import pytest
import torch

from kvcache_repro.measure import quality, scenarios, speed
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.runner import accuracy_runs
from kvcache_repro.verdicts import claims


def ratio(name, value, blocks):
    return speed.SpeedRatio(name, value, tuple(blocks), 100.0, 6)


@pytest.mark.parametrize("hqq_blocks, quanto_blocks, verdict", [
    ((1.70, 1.75), (1.40, 1.45), claims.HOLDS),
    ((1.40, 1.60), (1.45, 1.50), claims.UNDECIDED),  # faster in one block, slower in the other: inside the spread
    ((1.20, 1.25), (1.40, 1.45), claims.FAILS),
    # a 2-core EPYC run: the blocks' ranges overlap, yet hqq4 is slower in each block
    ((1.498, 1.645), (1.183, 1.580), claims.HOLDS),
    ((1.40, 1.50), (1.45, 1.55), claims.FAILS),  # faster in each block of the same rounds
])
def test_hqq_slower_than_quanto_needs_the_same_answer_in_every_block(hqq_blocks, quanto_blocks, verdict):
    setup = speed.SPEED_SETUPS["tiny"]
    r = {"quanto4": ratio("quanto4", sum(quanto_blocks) / 2, quanto_blocks),
         "hqq4": ratio("hqq4", sum(hqq_blocks) / 2, hqq_blocks)}
    assert claims.hqq_slower_than_quanto(setup, r).verdict == verdict


@pytest.mark.parametrize("blocks, verdict", [
    ((1.10, 1.20), claims.HOLDS), ((0.98, 1.05), claims.UNDECIDED), ((0.80, 0.90), claims.FAILS)])
def test_quantization_slows_decoding_needs_every_block_above_one(blocks, verdict):
    setup = speed.SPEED_SETUPS["tiny"]
    r = {"quanto4": ratio("quanto4", 1.5, (1.4, 1.6)), "hqq4": ratio("hqq4", sum(blocks) / 2, blocks)}
    assert claims.quantization_slows_decoding(setup, r).verdict == verdict


def _m(backend, batch, peak, cache, before=1000):
    return Measurement("x", backend, batch, "cpu", 8, 40, 1.0, before,
                       {"peak_allocated": peak, "cache_bytes": cache}, cache)


@pytest.mark.parametrize("quanto_peak, hqq_peak, a_lot, quanto_less", [
    (5000, 6000, claims.HOLDS, claims.HOLDS),
    (7600, 6000, claims.FAILS, claims.FAILS),   # one backend above 3/4 of none
    (6000, 6000, claims.HOLDS, claims.FAILS),   # equal bytes: quanto is not below
])
def test_memory_claims_at_the_large_batch(quanto_peak, hqq_peak, a_lot, quanto_less):
    scenario = scenarios.get("cpu-tiny")
    ms = [_m("none", 200, 10000, 4000), _m("quanto4", 200, quanto_peak, 1200), _m("hqq4", 200, hqq_peak, 1200)]
    assert claims.saves_a_lot_at_large_batch("cpu-tiny", scenario, ms).verdict == a_lot
    assert claims.quanto_less_than_hqq("cpu-tiny", scenario, ms).verdict == quanto_less


@pytest.mark.parametrize("saved, verdict", [(100, claims.HOLDS), (4000, claims.FAILS)])
def test_saving_the_whole_cache_is_not_little(saved, verdict):
    """The bound is half the unquantized cache (4000 bytes): saving all of it breaks the claim."""
    scenario = scenarios.get("cpu-short")
    none_peak = 1_000_000
    ms = [_m("none", 1, none_peak, 4000)] + [_m(b, 1, none_peak - saved, 1000) for b in ("quanto4", "hqq4")]
    assert claims.saves_little_for_one_short_prompt("cpu-short", scenario, ms).verdict == verdict


def test_the_claims_table_is_written_as_markdown_and_json(tmp_path):
    setup = speed.SPEED_SETUPS["tiny"]
    result = claims.hqq_slower_than_quanto(setup, {"quanto4": ratio("quanto4", 1.4, (1.4, 1.45)),
                                                   "hqq4": ratio("hqq4", 1.7, (1.7, 1.75))})
    md, js = claims.write(tmp_path, [result], {"versions": {"torch": "x"}, "date": "d", "device": "cpu"})
    assert "HQQ is slower than quanto" in md.read_text() and "**holds**" in md.read_text()
    data = json.loads(js.read_text())
    assert data["claims"][0]["verdict"] == "holds" and data["claims"][0]["expected"] == "holds"


def test_undecided_comparisons_get_more_rounds_up_to_the_cap(monkeypatch):
    """interleaved_ratios measures another batch of rounds while a comparison is inside the
    spread, and stops at max_rounds with "not distinguishable" if it stays there."""
    ids = torch.zeros(1, 4, dtype=torch.long)

    def measured(hqq_step):
        times = {"none": 100, "quanto4": 150, "hqq4": hqq_step}
        monkeypatch.setattr(speed, "step_times", lambda model, ids, name, settings, new: [times[name]] * 4)
        monkeypatch.setattr(speed, "_quiet_steps", lambda model, names, *_: {n: [1, 2, 3] for n in names[1:]})
        return speed.interleaved_ratios(None, ids, ["quanto4", "hqq4"], None, 4, rounds=4, blocks=2,
                                        max_rounds=12)

    out = measured(150)
    assert out["hqq4"].rounds == 12  # equal costs never separate: 3 batches of 4, then stop
    assert speed.compare(out["hqq4"], out["quanto4"]) == speed.NOT_DISTINGUISHABLE
    out = measured(200)
    assert out["hqq4"].rounds == 4 and speed.decided(out)  # decided at once: no extra rounds


@pytest.mark.parametrize("hqq, quanto, verdict", [
    ((0.05, 10.2), (0.10, 10.5), claims.HOLDS),
    ((0.20, 12.2), (0.10, 11.1), claims.FAILS),
    ((0.06, 10.9), (0.10, 10.7), claims.UNDECIDED),  # closer predictions, worse on the text
])
def test_hqq_more_accurate_needs_kl_and_perplexity_to_agree(hqq, quanto, verdict):
    def q(kl, ppl):
        return quality.Quality(kl, 0.9, ppl, 10.0)

    for axis, hqq_name in ((0, "hqq4"), (1, "hqq4-axis1")):
        table = accuracy_runs.AccuracyTable("cpu", quality.ACCURACY_SETUPS["seed"],
                                            {"quanto4": q(*quanto), hqq_name: q(*hqq)}, 16)
        result = claims.hqq_more_accurate_than_quanto(table, 4, axis)
        assert result.verdict == verdict
        assert hqq_name in result.numbers and ("axis 1" in result.setting) == (axis == 1)


def test_claims_from_xdist_workers_reach_the_table_in_a_fixed_order(tmp_path):
    """The plugin's worker -> controller path, without processes: each worker's claims arrive
    and the table reads in CLAIMS order whichever worker finished first."""
    import types

    from kvcache_repro.plugin import state, summary

    speed_claim = claims.ClaimResult("hqq_slower_than_quanto", "tiny", "s", "n", "m", claims.HOLDS, {"x": 1.5})
    memory_claim = claims.ClaimResult("saves_a_lot_at_200_prompts", "cpu-tiny", "s", "n", "m", claims.FAILS)

    def worker(results):
        config = types.SimpleNamespace(workerinput={}, workeroutput={}, stash=pytest.Stash())
        config.stash[state.CLAIMS] = results
        summary.pytest_sessionfinish(types.SimpleNamespace(config=config))
        return config.workeroutput

    controller = types.SimpleNamespace(rootpath=tmp_path, getoption=lambda name: False, stash=pytest.Stash())
    for output in (worker([speed_claim]), worker([memory_claim])):  # the speed worker finished first
        summary.pytest_testnodedown(types.SimpleNamespace(workeroutput=output, config=controller), None)
    lines = []
    reporter = types.SimpleNamespace(section=lambda title: lines.append(f"== {title}"), write_line=lines.append)
    summary.pytest_terminal_summary(reporter, 0, controller)
    written = json.loads((tmp_path / "results" / "claims.json").read_text())
    assert [c["claim_id"] for c in written["claims"]] == ["saves_a_lot_at_200_prompts", "hqq_slower_than_quanto"]
    assert written["claims"][1]["data"] == {"x": 1.5}
    assert any("\nsaves_a_lot_at_200_prompts" in line for line in lines), lines
