"""GPU baselines predicted from the CPU (kvcache_repro/runner/gpu_prediction.py): every
scenario of the device run's plan has them, they say they are predictions and why their
bands are as wide as they are, and a miss reads as a prediction that missed. The scaling
is measured, not assumed: the dry runs' entries are predicted the same way, and
tests/test_memory_experiment.py and ./kvq device-run --dry-run check runs against them."""
from __future__ import annotations

import pytest

from kvcache_repro.backends import offline
from kvcache_repro.gpu import plan
from kvcache_repro.runner import experiment, gpu_prediction
from kvcache_repro.measure import scenarios
from kvcache_repro.core import provenance
from kvcache_repro.verdicts import baseline_file, baseline_update, comparison, paths

PLANNED = [n + dry for dry in ("", scenarios.DRY_SUFFIX) for n in scenarios.DEVICE_PLAN]


@pytest.mark.parametrize("name", PLANNED)
def test_every_planned_scenario_has_predicted_entries_of_what_it_compares(name):
    """A first GPU run must find an entry for every ratio it compares (a missing one fails
    by design): each planned scenario's file holds predicted entries for every quantized
    backend x batch x compared metric, each with its terms and limits."""
    scenario = scenarios.get(name)
    stored = baseline_file.load(paths.baseline_path(name))
    want = {baseline_file.entry_key(b, n, m) for b in scenario.backends if b != "none"
            for n in scenario.batch_sizes for m in scenario.baseline_metrics}
    assert want <= set(stored.entries), sorted(want - set(stored.entries))
    for key in want:
        entry = stored.entries[key]
        assert baseline_file.is_predicted(entry), key
        assert entry.produced_by["source"] == gpu_prediction.COMMAND and entry.produced_by["limits"]
        assert "prediction" in entry.produced_by


def test_tiny_llama_architecture_is_the_tiny_model():
    """gpu-tiny runs models.tiny_model("llama"); its prediction builds offline.ARCHS["tiny-llama"]."""
    import torch

    from kvcache_repro.backends import models

    tiny = models.tiny_model("llama")
    meta = offline.meta_model("tiny-llama", torch.float32)
    assert [tuple(p.shape) for p in tiny.parameters()] == [tuple(p.shape) for p in meta.parameters()]


def test_a_narrow_proxy_keeps_what_the_cache_and_attention_depend_on():
    for arch in ("llama3-8b", "smollm2-135m", "tiny-llama", "dry-tiny"):
        full, narrow = offline.arch_config_kwargs(arch), offline.arch_config_kwargs(f"{arch}-narrow@2")
        for key in ("num_attention_heads", "num_key_value_heads", "head_dim"):
            assert narrow[key] == full[key], (arch, key)
        assert narrow["num_hidden_layers"] == 2
        assert all(narrow[k] <= full[k] for k in ("hidden_size", "intermediate_size", "vocab_size"))
        assert narrow["bos_token_id"] < narrow["vocab_size"] and narrow["eos_token_id"] < narrow["vocab_size"]


@pytest.mark.parametrize("name", PLANNED)
def test_proxies_end_in_the_scenario_s_residual_phase(name):
    """The same residual length at the end: a quantized cache's peak comes at the same
    point of its flush cycle in the proxy as in the run."""
    scenario = scenarios.get(name)
    r = scenario.settings.residual_length
    for n in gpu_prediction.proxy_tokens(scenario):
        assert (n - 1) % r == (scenario.new_tokens - 1) % r and n > r


def test_the_scaling_from_proxies_to_a_run():
    """One layer's bytes, what each further layer adds and what the width adds, linear in
    tokens and proportional to rows: hand-computed on made-up proxy numbers."""
    target = scenarios.get("seed-arch")  # 32 layers, 1000 new tokens
    runs = {"narrow1": {100: 1_000, 200: 2_000}, "narrow2": {100: 1_300, 200: 2_500}, "wide1": {100: 1_400}}
    # at 1000 tokens: one layer 1_000 + 10 x 900 = 10_000; two layers 1_300 + 12 x 900 = 12_100, so
    # each further layer 2_100; the width +400 (wide 1_400 - narrow 1_000 at 100 tokens)
    expected = (10_000 + 31 * 2_100 + 400) * 200 / gpu_prediction.PROXY_ROWS
    assert gpu_prediction.above_weights(target, runs, 32, 200) == pytest.approx(expected)


def test_the_band_covers_hqq_s_float16_path_and_cuda_only_allocations():
    """The same predicted bytes give a wider band on CUDA (hqq 0.5..1 x, kernels +/- 10%,
    0..64 MiB of CUDA-only allocations) than for the CPU itself (the dry run: scaling only)."""
    cuda, cpu = scenarios.get("gpu-small"), scenarios.get("gpu-small-dry")
    q = gpu_prediction.Predicted("hqq4", 200, 10 * 2**30, 0, 2 * 2**30, 4 * 2**30)
    none = gpu_prediction.Predicted("none", 200, 10 * 2**30, 0, 8 * 2**30, 1 * 2**30)
    centre_cuda, half_cuda = gpu_prediction.ratio_band(cuda, q, none)
    centre_cpu, half_cpu = gpu_prediction.ratio_band(cpu, q, none)
    assert half_cuda > 3 * half_cpu
    low = (12 * 2**30 + 0.5 * 0.9 * 4 * 2**30) / (18 * 2**30 + 1.1 * 2**30)  # hqq 0.5 x, kernels -10% / +10%
    assert centre_cuda - half_cuda <= low + 1e-9
    assert centre_cpu == pytest.approx(16 / 19, abs=0.01)


def test_the_reserved_band_spans_no_holes_to_the_replayed_ones():
    """Peak reserved q / none: each run's peak allocated (every corner of its band) in whole
    pages, from no holes to the replay's share (+10%) of what generate allocated and a page of
    each pool beyond; hand-computed at the extreme corners."""
    from kvcache_repro.measure import reserved

    target = scenarios.get("gpu-small")
    G = 2**30
    q = gpu_prediction.Predicted("quanto4", 200, 10 * G, 0, 2 * G, 1 * G)  # peak 13 GiB
    none = gpu_prediction.Predicted("none", 200, 10 * G, 0, 8 * G, 1 * G)  # peak 19 GiB
    holes = {"quanto4": {200: 0.4}, "none": {200: 0.2}}
    assert gpu_prediction.holes_allowance(holes, "quanto4", 200) == pytest.approx(0.44)
    assert gpu_prediction.holes_allowance(holes, "hqq4", 200) == reserved.HOLES_SHARE  # no replay for it
    centre, half = gpu_prediction.reserved_band(target, q, none, holes)
    page, small = reserved.LARGE_PAGE, reserved.SMALL_PAGE
    # lowest: q's transient -10% with no holes over none's +10% with all its holes, the CUDA-only
    # bytes (0 or 64 MiB) in both
    def low(extra):  # q in whole 2 MiB pages, no holes; none with its holes and a page of each pool beyond
        n_peak = 18 * G + 1.1 * G + extra
        return (reserved.round_up(12 * G + 0.9 * G + extra, small)
                / reserved.round_up(n_peak + 0.22 * (n_peak - 10 * G) + page + small, small))
    assert centre - half + gpu_prediction.FLOOR == pytest.approx(min(low(0), low(gpu_prediction.CUDA_EXTRA_BYTES)))
    without = gpu_prediction.reserved_band(target, q, none, {"quanto4": {200: 0.0}, "none": {200: 0.0}})
    assert without[1] < half  # holes only widen it


def test_a_missed_prediction_says_so_and_a_measurement_replaces_it(tmp_path):
    entry = baseline_file.Entry("quanto4", 200, "peak_allocated", 0.40, 0.02,
                                {"kind": "predicted", "source": gpu_prediction.COMMAND, "versions": {}})
    path = tmp_path / "seed-arch.json"
    baseline_update.update(path, [entry], run_failed=False, scenario="seed-arch")
    stored = baseline_file.load(path)
    held = comparison.compare(stored, "quanto4", 200, "peak_allocated", 0.41)
    missed = comparison.compare(stored, "quanto4", 200, "peak_allocated", 0.52)
    assert held.passed and "the prediction holds" in held.message
    assert not missed.passed and "PREDICTION MISSED" in missed.message and "prediction" in missed.basis
    measured = baseline_file.Entry("quanto4", 200, "peak_allocated", 0.52, 0.05,
                                   {"device": "NVIDIA H200", "versions": {}})
    lines = baseline_update.update(path, [measured], run_failed=False, scenario="seed-arch")
    assert "replaces the prediction" in lines[0]
    now = baseline_file.load(path).entries["quanto4/b200/peak_allocated"]
    assert (now.ratio, now.tolerance, baseline_file.is_predicted(now)) == (0.52, 0.05, False)


def test_the_prediction_decides_gpu_claims_only_where_its_bands_do():
    """The GPU rows of the claims table are expected to come out as the predicted bands
    imply (baselines/<scenario>.json): decided where a band lies wholly on one side of the
    claim's margin, left to the GPU run where it straddles it."""
    from kvcache_repro.verdicts import claims

    assert claims.predicted_verdict("saves_a_lot_at_200_prompts", "gpu-small")[0] == claims.HOLDS
    # 8 of 32 layers: hqq's one-layer transient outweighs a quarter of the saving
    assert claims.predicted_verdict("saves_a_lot_at_200_prompts", "seed-arch-short")[0] == claims.FAILS
    assert claims.predicted_verdict("quanto_uses_less_memory_than_hqq", "seed-arch-short")[0] == claims.HOLDS
    verdict, why = claims.predicted_verdict("saves_a_lot_at_200_prompts", "seed-arch")
    assert verdict is None and "straddle 0.75" in why, why


def test_a_card_s_measurement_gets_a_file_of_its_own_and_the_prediction_stays(tmp_path, monkeypatch):
    """--update-baselines on a GPU writes baselines/NAME--CARD.json; that card compares with
    it from then on, every other card with the prediction, which stays as it was."""
    import shutil

    from kvcache_repro.measure.memory import Measurement

    root = tmp_path / "baselines"
    shutil.copytree(baseline_file.BASELINE_DIR, root)
    monkeypatch.setattr(baseline_file, "BASELINE_DIR", root)
    predicted = (root / "gpu-tiny.json").read_bytes()
    monkeypatch.setattr(provenance, "device_name", lambda device: "NVIDIA H200")
    scenario = scenarios.get("gpu-tiny")
    ms = [Measurement("gpu-tiny", b, n, "cuda", 8, 64, 1.0, 100,
                      {"peak_allocated": p * n, "cache_bytes": c * n}, c * n)
          for b, p, c in (("none", 1000, 400), ("quanto4", 990, 180), ("hqq4", 1500, 180)) for n in (1, 8)]
    monkeypatch.setattr(experiment, "provenance", lambda s, m: {"device": "NVIDIA H200", "versions": {}})
    experiment.update_baselines(scenario, ms, experiment.ratios(ms, scenario.baseline_metrics),
                                run_failed=False)
    card = root / "gpu-tiny--NVIDIA-H200.json"
    assert card.exists() and (root / "gpu-tiny.json").read_bytes() == predicted
    assert paths.compared_path("gpu-tiny") == card
    assert not baseline_file.is_predicted(baseline_file.load(card).entries["quanto4/b8/peak_allocated"])
    monkeypatch.setattr(provenance, "device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    assert paths.compared_path("gpu-tiny") == root / "gpu-tiny.json"


def test_a_first_run_on_a_card_records_what_no_file_holds_and_a_second_compares(tmp_path, monkeypatch):
    """seed.json holds only the published reserved-after ratios (taken under the default
    allocator): a first expandable-segments run on a card records its other ratios in
    baselines/seed--CARD.json and passes, saying so; the next run compares with them. A run
    with a failing verdict records nothing, and a CPU scenario's missing entry still fails."""
    import shutil

    from kvcache_repro.measure import reserved
    from kvcache_repro.measure.memory import Measurement

    root = tmp_path / "baselines"
    shutil.copytree(baseline_file.BASELINE_DIR, root)
    monkeypatch.setattr(baseline_file, "BASELINE_DIR", root)
    monkeypatch.setattr(provenance, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(experiment, "provenance", lambda s, m: {"device": "NVIDIA H100 80GB HBM3", "versions": {},
                                                                "settings": {"allocator": reserved.run_allocator(s.device, m)}})
    seed = (root / "seed.json").read_bytes()
    scenario = scenarios.get("seed")

    def run(quanto_reserved_after=0.34):
        ms = [Measurement("seed", b, n, "cuda", 8, 1000, 1.0, 100,
                          {"peak_allocated": p * n, "peak_reserved": p * n + 7, "cache_bytes": c * n,
                           "reserved_after": (quanto_reserved_after * 1000 if b == "quanto4" else p) * n},
                          c * n, allocator=reserved.EXPANDABLE)
              for b, p, c in (("none", 1000, 400), ("quanto4", 600, 120), ("hqq4", 700, 120)) for n in (1, 200)]
        found = experiment.ratios(ms, scenario.baseline_metrics)
        return experiment.record_first_run(scenario, ms, found, experiment._verdicts(scenario, ms, found, []))

    first = run()
    card = root / "seed--NVIDIA-H100-80GB-HBM3.json"
    assert all(v.passed for v in first), comparison.problems(first)
    recorded = [v for v in first if v.status == "recorded"]
    assert len(recorded) == 14 and all(str(card) in v.message and "first run" in v.message for v in recorded)
    assert {v.status for v in first if v.key.endswith("b200/reserved_after")} == {"reported"}  # another allocator
    assert (root / "seed.json").read_bytes() == seed and len(baseline_file.load(card).entries) == 14
    second = run()
    assert {v.status for v in second if not v.key.endswith("b200/reserved_after")} == {"ok"}
    card.unlink()
    entry = baseline_file.load(root / "seed.json").entries["quanto4/b200/reserved_after"]
    assert entry.allocator == "default"
    monkeypatch.setattr(reserved, "EXPANDABLE", "default")  # the run under the seed's own allocator ...
    failed = run(quanto_reserved_after=0.9)  # ... reserving far more than the seed's 0.338
    assert not card.exists() and any(v.status == "regression" for v in failed)
    cpu = scenarios.get("cpu-tiny")
    assert not cpu.records_first_run and scenarios.get("gpu-tiny").records_first_run


def test_the_default_gpu_plan_is_predicted_to_fit_ten_minutes_on_an_h100():
    """pytest -m gpu without --kv-run-slow measures what needs no download (seed-arch-short,
    gpu-small, gpu-tiny); their predicted time (gpu/plan.py planned_seconds, a model stated
    there) stays under 10 minutes; seed (a download) and seed-arch are slow. A
    heavy scenario added to the default plan, or a row model that grows, fails here."""
    default = [n for n, marks in scenarios.for_tests("experiment") if "gpu" in marks and "slow" not in marks]
    assert sorted(default) == ["gpu-small", "gpu-tiny", "seed-arch-short"]
    assert {n for n, marks in scenarios.for_tests("experiment") if "slow" in marks and "gpu" in marks} == {
        "seed", "seed-arch"}
    seconds = {n: plan.planned_seconds(scenarios.get(n)) for n in default}
    assert sum(seconds.values()) <= 600, seconds
    # a row: start + tokens x (layers x launches + bytes / bandwidth); gpu-tiny's 2 layers x 64 tokens
    # are start-bound: 6 rows x ROW_START_S and a little
    assert 6 * plan.ROW_START_S < seconds["gpu-tiny"] < 6 * plan.ROW_START_S + 2
    assert plan.planned_seconds(scenarios.get("seed")) is None  # no prediction to build it from
