"""Decode speed per backend with pytest-benchmark (wall clock, information only), and the
quantized/none decode CPU-time ratio (measure/speed.py) against a stored band. Deselect with
``-m "not benchmark"``; the real-model ratio (~5 min) needs ``--kv-run-slow``.
"""
from __future__ import annotations

import pytest

from kvcache_repro.backends import generation
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.measure import speed
from kvcache_repro.verdicts import comparison, speed as speed_verdicts

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize("speed_backend", ["none", "quanto4", "hqq4"])
def test_decode_throughput_tiny(benchmark, speed_backend):
    setup = speed.SPEED_SETUPS["tiny"]
    model, ids = speed.model_and_ids(setup)

    args = (model, ids, BACKENDS[speed_backend], setup.settings, setup.new_tokens)
    run = benchmark.pedantic(generation.generate, args=args, kwargs={"keep_scores": False}, rounds=2,
                             warmup_rounds=1)  # information only: the verdicts are speed.py's
    benchmark.extra_info["generated_tokens"] = setup.batch * setup.new_tokens
    assert run.new_tokens.shape == (setup.batch, setup.new_tokens)


@pytest.mark.parametrize("setup_name", ["tiny", pytest.param("real", marks=pytest.mark.slow)])
def test_speed_within_baseline_bands(speed_ratios, setup_name):
    """Each banded ratio inside its band. The tiny setup's are reported, not banded: between
    CPU code paths of one machine quanto4 spans 1.37-1.65, hqq4 1.62-2.47 (docs/bands.md)."""
    setup = speed.SPEED_SETUPS[setup_name]
    verdicts = speed_verdicts.verdicts(setup, speed_ratios(setup_name))
    failing = comparison.problems(verdicts)
    assert not failing, "\n".join(failing)
    if verdicts and all(v.status == "reported" for v in verdicts):
        pytest.skip("no banded speed ratio on this setup (reported only): " + "; ".join(v.message for v in verdicts))


@pytest.mark.parametrize("setup_name, quantized", [("tiny", "quanto4"), ("tiny", "hqq4")],
                         ids=["tiny-quanto4", "tiny-hqq4"])
def test_steps_between_flushes_within_the_loose_bound(speed_ratios, setup_name, quantized):
    """A gross slowdown fails: a decode step that does not re-quantize costs at most
    verdicts/speed.LOOSE x the slowest ratio stored for this CPU capability (every machine and
    path of it measured; fault ``dequantize_thrice`` breaks it, docs/faults.md; a capability with
    no stored run gets the loosest bound of all, which that fault may pass). Not a band: the ratio
    moves 25% between paths of one machine; subtle slowdowns are ``./kvq side-by-side``'s."""
    from kvcache_repro.core.provenance import machine

    setup = speed.SPEED_SETUPS[setup_name]
    capability = machine()["torch_capability"]
    bound = speed_verdicts.ceilings(setup, capability).get(quantized)
    assert bound is not None, (
        f"no stored spread of {quantized}'s between-flushes time ratio in {speed_verdicts.baseline_path(setup)}: "
        "measure it with `./kvq spread baselines/spread/NAME --parts speed`, then "
        "`python -m kvcache_repro bands apply baselines/spread/*/*.json --write`")
    measured = speed_ratios(setup_name)[quantized].between_flushes
    assert measured > 0, f"{quantized}: no between-flushes ratio measured ({measured})"
    assert measured <= bound[0], (
        f"{quantized}: a decode step between flushes takes {measured:.3f} x none's, above the loose bound "
        f"{bound[0]:.3f} ({bound[1]}): a gross slowdown of the quantized cache's every step")


def test_under_xdist_the_speed_the_tests_use_is_measured_ahead_and_handed_over(tmp_path, monkeypatch):
    """The controller measures, before scheduling, once, exactly the speed setups the
    collected tests use; a worker's fixture reads the same ratios back."""
    import types

    from kvcache_repro.plugin import kinds

    fake = {"quanto4": speed.SpeedRatio("quanto4", 1.4, (1.38, 1.42), 6000.0, 6)}
    calls = []
    monkeypatch.setattr(speed, "measure_in_fresh_process", lambda setup: calls.append(setup.name) or fake)
    monkeypatch.setenv(kinds.SPEED_FILE_ENV, str(tmp_path / "speed.json"))
    config = types.SimpleNamespace(getoption=lambda name: False, stash=pytest.Stash())
    ids = ["tests/test_speed.py::test_speed_within_baseline_bands[tiny]@speed",
           "tests/test_speed.py::test_speed_within_baseline_bands[real]@speed",
           "tests/test_models.py::test_a_copy_is_complete_or_absent"]
    for _ in range(2):  # one call per worker: measured once
        kinds.pytest_xdist_node_collection_finished(types.SimpleNamespace(config=config), ids)
    assert calls == ["tiny"]
    assert speed.ratios_from_json(kinds.measured_ahead()["tiny"]) == fake
