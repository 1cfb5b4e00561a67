"""Teacher-forced accuracy of each quantized cache on a real trained model
(SmolLM2-135M-Instruct, offline), against the unquantized cache: invariants that hold
whatever the numbers, and stored baselines that catch drift.

The text is the stdlib's pydoc_data.topics; G 128 and residual 64 as in the seed.
"core" (default tier): every backend, 2 rows x (64 prefilled + 128 decoded) tokens, 16
tokens per forward. "full" (slow): the same protocol one token per forward, the check
that 16-token forwards change nothing. "seed" (slow): the seed's length, 4 rows x (64 +
1,024) tokens, quanto4 / hqq4 / hqq4-axis1. CUDA runs the same code under the gpu marker.
"""
from __future__ import annotations

import pytest
from kvcache_repro.runner import accuracy_runs
from kvcache_repro.verdicts import claims, comparison
from kvcache_repro.measure import quality

TABLES = [
    pytest.param(("cpu", "core"), id="cpu-core"),
    pytest.param(("cpu", "full"), id="cpu-full", marks=pytest.mark.slow),
    pytest.param(("cpu", "seed"), id="cpu-seed", marks=pytest.mark.slow),
    pytest.param(("cuda", "core"), id="cuda-core", marks=pytest.mark.gpu),
    pytest.param(("cuda", "full"), id="cuda-full", marks=pytest.mark.gpu),
]


@pytest.fixture(scope="module", params=TABLES)
def table(request, accuracy_tables):
    return accuracy_tables(*request.param)


@pytest.mark.parametrize("ladder, bits", [("quanto", [2, 4]), ("hqq", [1, 2, 3, 4, 8]), ("hqq-axis1", [1, 2, 4, 8])],
                         ids=["quanto", "hqq", "hqq-axis1"])
def test_error_falls_as_nbits_rises(table, ladder, bits):
    names = [name for name in (accuracy_runs.backend_name(ladder, n) for n in bits) if name in table.finite_results]
    if len(names) < 2:
        pytest.skip(f"the {table.setup.name} table has fewer than two {ladder} bit widths")
    kls = [table.results[n].kl for n in names]
    agreement = [table.results[n].top1_agreement for n in names]
    assert all(a > b for a, b in zip(kls, kls[1:])), f"{ladder} KL by nbits {bits}: {kls}"
    assert all(a <= b for a, b in zip(agreement, agreement[1:])), f"{ladder} top-1 by nbits {bits}: {agreement}"


@pytest.mark.parametrize("name", ["hqq8", "hqq8-axis1"])
def test_hqq_8bit_is_near_lossless(table, name):
    if name not in table.results:
        pytest.skip(f"{name} is not in the {table.setup.name} table")
    _skip_nonfinite(table, name, name.replace("8", "4"))
    """KL is second order in the logit perturbation, which is first order in the step;
    8 bits shrink the step (2^8-1)/(2^4-1) = 17x against 4 bits, so KL should shrink
    ~289x. 10x slack for non-uniform rounding. Top-1 may flip only where the reference's
    top two logits are nearly tied: at most 2 positions in 100, 2.5x the flips measured
    (hqq8 2 of 256, hqq8-axis1 none, on every CPU path of baselines/spread; the former
    bound of 1 in 100 was one flip away from that)."""
    kl4 = table.results[name.replace("8", "4")].kl
    q8 = table.results[name]
    assert q8.kl <= kl4 * (15 / 255) ** 2 * 10, (q8.kl, kl4)
    assert q8.top1_agreement >= 0.98, q8


# How far a near-lossless cache lowered perplexity by chance, across machines and CPU paths
# (baselines/spread, 2026-12-01): hqq8 0.134% (AVX512 machine of issue 17, ATen avx2),
# 0.115% (same, own path), 0.07% (ATen default here); hqq8-axis1 0.07%. The bound is
# 3.7x the largest: 0.5%.
CHANCE_IMPROVEMENT = 0.005


def test_quantized_cache_never_beats_the_reference_beyond_noise(table):
    """A lossy cache can lower perplexity only by chance (CHANCE_IMPROVEMENT). Below
    reference x (1 - 0.005) is a measurement or harness bug, e.g. a reference run that
    loses context (fault ``plain_cache_window``: every quantized cache then "beats" it
    by 20% and more)."""
    ref = table.reference_perplexity
    better = {n: q.perplexity for n, q in table.finite_results.items() if q.perplexity < ref * (1 - CHANCE_IMPROVEMENT)}
    assert not better, f"reference perplexity {ref:.4f}; suspiciously better: {better}"


def test_reference_perplexity_is_that_of_a_trained_model(table):
    """docs/facts.md measured ~13.4 on 1,024 tokens of this text; a broken load (random or
    garbled weights) gives hundreds to tens of thousands (vocabulary 49,152)."""
    assert 3 < table.reference_perplexity < 40


def test_reference_perplexity_within_its_band(table):
    """The unquantized reference's perplexity against its stored band (0.2%; the same value
    to 6 digits on every CPU path of both machines measured). Every other accuracy number is
    relative to this run, so a regression of the model itself - every cache alike - passes
    them all: fault ``attention_scale_drift`` (docs/faults.md)."""
    reference = [v for v in table.verdicts() if v.key.startswith("none/")]
    assert [v.key for v in reference] == [f"none/b{table.setup.rows}/reference_perplexity"]
    failing = comparison.problems(reference)
    assert not failing, "\n".join(failing)


def test_accuracy_within_baseline_bands(table):
    """Every finite backend's entries against their bands; a backend with non-finite logits
    is left out here (test_logits_are_finite names it), so the others are still compared."""
    failing = comparison.problems([v for v in table.verdicts() if not v.key.startswith("none/")])
    assert not failing, "\n".join(failing)


@pytest.mark.parametrize("name", quality.ALL_QUANTIZED)
def test_logits_are_finite(table, name):
    """A backend whose logits hold NaN or inf (torch 2.11's fp8 KL was NaN: issue 18) is a
    [behaviour] finding naming the backend, the releases and where it first appears
    (prefill, before or after which flush), not a crash of the band test. Fault
    ``hqq3_nan_after_flush`` fails it for hqq3 only."""
    if name not in table.results:
        pytest.skip(f"{name} is not in the {table.setup.name} table")
    assert name not in table.nonfinite, table.nonfinite_message(name)


def _skip_nonfinite(table, *names):
    if broken := [n for n in names if n in table.nonfinite]:
        pytest.skip(f"{', '.join(broken)}: non-finite logits (test_logits_are_finite says where)")


# 16- vs 1-token forwards on one machine: fp8 differs by design (3.8%, see below), the rest
# by < 0.1%; 10% is 2.6x fp8's difference and far below a wrong flush schedule's effect.
SAME_PROTOCOL_KL = 0.10


@pytest.mark.slow
def test_16_token_forwards_give_the_numbers_of_1_token_forwards(accuracy_tables):
    """"core" feeds 16 tokens per forward, "full" the same protocol one at a time: every
    KL within 10% (SAME_PROTOCOL_KL), top-1 within its band (2 positions), and the same
    verdict for every accuracy claim. Measured on 5.24: quanto and hqq KL within 0.1%,
    top-1 identical; fp8 3.8% (no residual: a forward's earlier tokens are seen
    unquantized)."""
    core, full = accuracy_tables("cpu", "core"), accuracy_tables("cpu", "full")
    positions = core.setup.rows * core.setup.decode
    for name, q in core.results.items():
        ref = full.results[name]
        assert abs(q.kl - ref.kl) <= SAME_PROTOCOL_KL * ref.kl, (name, q.kl, ref.kl)
        assert abs(q.top1_agreement - ref.top1_agreement) <= 2 / positions + 1e-9, (name, q, ref)
    for nbits, axis in ((2, 0), (4, 0), (4, 1)):
        assert (claims.hqq_more_accurate_than_quanto(core, nbits, axis).verdict
                == claims.hqq_more_accurate_than_quanto(full, nbits, axis).verdict)
