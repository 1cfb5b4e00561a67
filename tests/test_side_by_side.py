"""Speed of two environments side by side (kvcache_repro/releases/side_by_side.py): the
verdict logic on made-up step times, and how `./kvq compat` stores and shows it. Its power
on this machine is measured, not tested here (docs/releases.md)."""
from __future__ import annotations

from kvcache_repro.releases import compat, results
from kvcache_repro.releases import side_by_side as sbs


def _rounds(per_step_ns, rounds=8, noise=0):
    return [[t + (noise if r % 2 else 0) for t in per_step_ns] for r in range(rounds)]


def test_a_candidate_slower_beyond_the_margin_is_called_slower():
    base = {"none": _rounds([100, 100]), "quanto4": _rounds([200, 200])}
    slow = {"none": _rounds([100, 100]), "quanto4": _rounds([200 * (1 + sbs.MARGIN) + 10, 260])}
    found = sbs.compare(base, slow, blocks=4)
    assert found["quanto4"].verdict == sbs.SLOWER and found["none"].verdict == sbs.NOT_DISTINGUISHABLE
    assert found["none"].ratio == 1.0


def test_the_per_step_minimum_ignores_a_disturbed_round_and_a_faster_candidate_is_faster():
    base = {"hqq4": _rounds([300, 300], noise=500)}  # every other round disturbed: the minimum is 300
    fast = {"hqq4": _rounds([100, 100])}
    found = sbs.compare(base, fast, blocks=4)
    assert found["hqq4"].block_ratios == (1 / 3,) * 4 and found["hqq4"].verdict == sbs.FASTER


def test_inside_the_margin_or_with_blocks_disagreeing_is_not_distinguishable():
    assert sbs.verdict(1 + sbs.MARGIN / 2, (1 + sbs.MARGIN / 2,) * 4) == sbs.NOT_DISTINGUISHABLE
    # beyond the margin overall, but two of four blocks (two pairs of processes) faster
    assert sbs.verdict(1 + 2 * sbs.MARGIN, (1.6, 1.6, 0.95, 0.97)) == sbs.NOT_DISTINGUISHABLE
    assert sbs.verdict(1 + 2 * sbs.MARGIN, (1.6, 1.6, 1.1, 0.97)) == sbs.SLOWER  # all but one agree


def test_compat_stores_the_comparison_and_the_matrix_shows_what_moved():
    def fake_run(baseline, candidate, log):
        found = sbs.compare({"none": _rounds([100]), "hqq4": _rounds([100])},
                            {"none": _rounds([100]), "hqq4": _rounds([150])}, blocks=4)
        return found, {"torch": "2.13.0"}, {"torch": "2.14.1"}

    stored = compat.speed_side_by_side("/env/bin/python", log=lambda line: None, run=fake_run)
    assert stored["verdicts"]["hqq4"] == {"ratio": 1.5, "blocks": [1.5] * 4, "verdict": sbs.SLOWER}
    run = {**compat.summarize("torch==2.14.1", [], versions={"torch": "2.14.1"}), "speed": stored}
    assert results.speed_cell(run) == "**hqq4 1.50 slower**"
    assert "- hqq4: 1.500 (blocks 1.500..1.500): slower" in results.release_section(run)
    assert results.speed_cell({**run, "speed": None}) == "not run"


def test_a_worker_that_fails_is_a_stored_result_not_a_crash():
    def failing(baseline, candidate, log):
        raise RuntimeError("candidate (/env/bin/python): the worker did not start (exit 1)")

    stored = compat.speed_side_by_side("/env/bin/python", log=lambda line: None, run=failing)
    assert results.speed_cell({"speed": stored}).startswith("FAILED: candidate")
