"""Speed of two environments side by side (kvcache_repro/releases/side_by_side.py): the
verdict logic on made-up step times. Its power on this machine is measured, not tested
here (docs/releases.md: a 1.5x dequantize costs the tiny setup ~7% of decode time, inside
the 20% that one worker drifts within a run, so it is not yet called slower)."""
from __future__ import annotations

from kvcache_repro.releases import side_by_side as sbs


def _rounds(per_step_ns, rounds=6, noise=0):
    return [[t + (noise if r % 2 else 0) for t in per_step_ns] for r in range(rounds)]


def test_a_candidate_slower_in_every_block_beyond_the_margin_is_called_slower():
    base = {"none": _rounds([100, 100]), "quanto4": _rounds([200, 200])}
    slow = {"none": _rounds([100, 100]), "quanto4": _rounds([200 * (1 + sbs.MARGIN) + 10, 260])}
    found = sbs.compare(base, slow, blocks=3)
    assert found["quanto4"].verdict == sbs.SLOWER and found["none"].verdict == sbs.NOT_DISTINGUISHABLE
    assert found["none"].ratio == 1.0


def test_the_per_step_minimum_ignores_a_disturbed_round_and_a_faster_candidate_is_faster():
    base = {"hqq4": _rounds([300, 300], noise=500)}  # every other round disturbed: the minimum is 300
    fast = {"hqq4": _rounds([100, 100])}
    found = sbs.compare(base, fast, blocks=3)
    assert found["hqq4"].block_ratios == (1 / 3,) * 3 and found["hqq4"].verdict == sbs.FASTER


def test_inside_the_margin_is_not_distinguishable():
    assert sbs.verdict((1.0 + sbs.MARGIN / 2,) * 3) == sbs.NOT_DISTINGUISHABLE
    assert sbs.verdict((1 + 2 * sbs.MARGIN, 1 + 2 * sbs.MARGIN, 1.0)) == sbs.NOT_DISTINGUISHABLE  # one block inside
