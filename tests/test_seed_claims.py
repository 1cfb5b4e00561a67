"""One test per claim of the seed, parametrized by setup: the claim's function in
kvcache_repro/verdicts/claims.py gives numbers and verdict, the test asserts the one expected
on that setup (claims.EXPECTED). Every run writes the table to results/claims.{md,json}."""
from __future__ import annotations

import pytest

from kvcache_repro.measure import scenarios, speed
from kvcache_repro.plugin import summary
from kvcache_repro.verdicts import claims


@pytest.mark.needs_backends('quanto4', 'hqq4')
def test_saves_little_for_one_short_prompt(claim_verdict, experiment_runs):
    """One seed prompt x 20 tokens on the real model: peak allocated saved by quantizing
    stays under half the unquantized cache (saving the whole cache would break it) and
    under 1% of the peak."""
    run = experiment_runs("cpu-short")
    claim_verdict(claims.saves_little_for_one_short_prompt("cpu-short", run.scenario, run.measurements))


# The scenarios measure/scenarios.toml tags "claims": "saves a lot" fails on cpu-tiny and holds
# on cpu-deep, each by a margin a fault crosses (docs/faults.md).
_CLAIMS = [pytest.param(n, marks=[getattr(pytest.mark, m) for m in ms]) for n, ms in scenarios.for_tests("claims")]
MEMORY_CLAIM_SCENARIOS = [p for p in _CLAIMS if scenarios.get(p.values[0]).device == "cpu"]
# The GPU rows: expected verdicts are what the CPU's predicted baselines imply; where a predicted
# band straddles the margin the row is recorded and the test skips.
GPU_CLAIM_SCENARIOS = [p for p in _CLAIMS if scenarios.get(p.values[0]).device == "cuda"]


@pytest.mark.needs_backends('quanto4', 'hqq4')
@pytest.mark.parametrize("scenario", MEMORY_CLAIM_SCENARIOS)
def test_saves_a_lot_at_200_prompts(claim_verdict, experiment_runs, scenario):
    """Peak allocated of each quantized run at the large batch <= 3/4 of none's: not on cpu-tiny
    (one of 2 layers' dequantized copy is half the cache), on the seed's 32 layers it is."""
    run = experiment_runs(scenario)
    claim_verdict(claims.saves_a_lot_at_large_batch(scenario, run.scenario, run.measurements))


ACCURACY_CLAIM_SETTINGS = [
    pytest.param("core", 2, 0, id="core-2bit"),
    pytest.param("core", 4, 0, id="core-4bit"),
    pytest.param("core", 4, 1, id="core-4bit-hqq-axis1"),
    pytest.param("seed", 4, 0, id="seed-4bit", marks=pytest.mark.slow),
    pytest.param("seed", 4, 1, id="seed-4bit-hqq-axis1", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("table_name, nbits, hqq_axis", ACCURACY_CLAIM_SETTINGS)
def test_hqq_more_accurate_than_quanto(claim_verdict, accuracy_tables, table_name, nbits, hqq_axis):
    """Teacher-forced KL and perplexity on SmolLM2: "core" (128 decoded tokens) a short-context
    proxy, "seed" the seed's 1,024 (slow). The verdict depends on the length and hqq's axis."""
    table = accuracy_tables("cpu", table_name)
    both = (f"hqq{nbits}" + ("-axis1" if hqq_axis else ""), f"quanto{nbits}")
    if absent := [name for name in both if name not in table.results]:
        pytest.skip(f"{', '.join(absent)} not in the {table_name} table: transformers refuses the installed quantizer "
                    "(test_version_expectations.py::test_transformers_builds_a_cache_with_the_installed_quantizer)")
    if broken := [name for name in both if name in table.nonfinite]:
        pytest.skip(f"{', '.join(broken)}: non-finite logits, nothing to decide (test_accuracy.py::test_logits_are_finite)")
    claim_verdict(claims.hqq_more_accurate_than_quanto(table, nbits, hqq_axis))


SPEED_SETUPS = ["tiny", pytest.param("real", marks=pytest.mark.slow)]


@pytest.mark.benchmark
@pytest.mark.parametrize("setup", SPEED_SETUPS)
def test_hqq_slower_than_quanto(claim_verdict, speed_ratios, setup):
    """hqq4's decode-time ratio against quanto4's, each block of rounds apart (speed.py): fails
    when hqq stops being slower beyond the spread, or one becomes clearly faster."""
    claim_verdict(claims.hqq_slower_than_quanto(speed.SPEED_SETUPS[setup], speed_ratios(setup)))


@pytest.mark.benchmark
@pytest.mark.parametrize("setup", SPEED_SETUPS)
def test_quantization_slows_decoding(claim_verdict, speed_ratios, setup):
    """Every block of rounds of every quantized backend slower than none."""
    claim_verdict(claims.quantization_slows_decoding(speed.SPEED_SETUPS[setup], speed_ratios(setup)))


@pytest.mark.needs_backends('quanto4', 'hqq4')
@pytest.mark.parametrize("scenario", MEMORY_CLAIM_SCENARIOS)
def test_quanto_uses_less_memory_than_hqq(claim_verdict, experiment_runs, scenario):
    """Peak allocated at the large batch, exact bytes: any gap decides. The cache bytes
    of the two are equal by construction (same packing); their transients are not."""
    run = experiment_runs(scenario)
    claim_verdict(claims.quanto_less_than_hqq(scenario, run.scenario, run.measurements))


@pytest.mark.needs_backends('quanto4', 'hqq4')
@pytest.mark.parametrize("scenario", GPU_CLAIM_SCENARIOS)
@pytest.mark.parametrize("claim", ["saves_a_lot_at_200_prompts", "quanto_uses_less_memory_than_hqq"])
def test_memory_claims_on_the_gpu_rows(claim_verdict, experiment_runs, request, scenario, claim):
    """The seed's memory claims decided on a GPU run's peak allocated at batch 200, against
    the verdict the CPU's prediction of that run implies."""
    run = experiment_runs(scenario)
    decide = claims.saves_a_lot_at_large_batch if claim == "saves_a_lot_at_200_prompts" else claims.quanto_less_than_hqq
    result = decide(scenario, run.scenario, run.measurements)
    result.predicted, why = claims.predicted_verdict(result.claim_id, result.setup)
    if result.expected is None:
        summary.record_claim(request.config, result)  # the table still shows it
        pytest.skip(f"{why}; measured: {result.verdict} ({result.numbers})")
    claim_verdict(result)
