"""The memory experiment's shared code, without running the experiment: the CPU probe,
scenario definitions, ratios, the report and the baseline update path."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from kvcache_repro.verdicts import baseline_file, comparison, paths
from kvcache_repro.runner import experiment, report
from kvcache_repro.measure import memory, scenarios
from kvcache_repro.measure.memory import Measurement


def test_cpu_probe_sees_a_known_allocation_to_the_byte():
    """peak_allocated = what was resident (given to start) + the peak of what the region
    created. RSS is information only (glibc may reuse pages it kept: no growth at all)."""
    resident = [torch.ones(1000)]
    probe = memory.CpuProbe()
    assert probe.start(resident) == 4000
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB
    metrics = probe.stop()
    del block
    assert metrics["peak_allocated"] == 4000 + 64 * 2**20, metrics


def test_cpu_probe_peak_is_reset_at_start():
    """A spike before start() must not count."""
    spike = torch.ones(128 * 2**20 // 4)
    del spike
    probe = memory.CpuProbe()
    probe.start()
    assert probe.stop()["peak_allocated"] == 0


def test_cuda_probe_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        memory.probe_for("cuda")


def test_seed_scenario_is_the_seed_s_settings():
    """docs/seed.md: 10 prompts x 20 = 200, 1000 new tokens, nbits 4, G 128, residual
    64, hqq axis 0, none/quanto/HQQ, fp16, NF4 weights, batch 1 and 200."""
    seed = scenarios.get("seed")
    assert seed.batch_sizes == (1, 200) and seed.new_tokens == 1000
    assert seed.settings.q_group_size == 128 and seed.settings.residual_length == 64
    specs = [scenarios.BACKENDS[b] for b in seed.backends]
    assert [(s.backend, s.nbits, s.axis) for s in specs] == [("none", None, None), ("quanto", 4, 0), ("hqq", 4, 0)]
    assert seed.dtype == "float16" and seed.weights_nf4 and seed.checkpoint == "gradientai/Llama-3-8B-Instruct-Gradient-1048k"
    prompts = seed.prompts(200)
    assert len(set(prompts)) == 10 and all(prompts.count(p) == 20 for p in set(prompts))
    assert "reserved_after" in seed.baseline_metrics


def test_seed_baseline_holds_the_seed_s_published_ratios():
    """Reserved after generation in the seed: none 55.99, quanto 18.94, HQQ 29.34 GB."""
    stored = baseline_file.load(paths.baseline_path("seed"))
    for backend, gb in (("quanto4", 18.94), ("hqq4", 29.34)):
        entry = stored.entries[baseline_file.entry_key(backend, 200, "reserved_after")]
        assert entry.ratio == pytest.approx(gb / 55.99, abs=5e-4)
        assert "seed" in entry.produced_by["source"]


def test_unknown_scenario_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: cpu-tiny, .*, gpu-small, seed, "):
        scenarios.get("gpu-large")


def _m(backend, batch, **metrics):
    return Measurement("cpu-tiny", backend, batch, "cpu", 8, 40, 1.0, 100, metrics, metrics.get("cache_bytes", 0))


def test_ratios_are_quantized_over_none_at_the_same_batch():
    ms = [_m("none", 1, cache_bytes=400, peak_rss=1000), _m("quanto4", 1, cache_bytes=100, peak_rss=900),
          _m("none", 8, cache_bytes=3200, peak_rss=2000), _m("quanto4", 8, cache_bytes=800, peak_rss=1000)]
    found = {(r.backend, r.batch, r.metric): r.value for r in experiment.ratios(ms, ("cache_bytes", "peak_rss"))}
    assert found == {("quanto4", 1, "cache_bytes"): 0.25, ("quanto4", 1, "peak_rss"): 0.9,
                     ("quanto4", 8, "cache_bytes"): 0.25, ("quanto4", 8, "peak_rss"): 0.5}


def test_measurement_survives_the_subprocess_json_round_trip():
    m = _m("hqq4", 8, cache_bytes=123, peak_rss=456)
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_report_table_and_outputs(tmp_path):
    scenario = scenarios.get("cpu-tiny")
    ms = [_m("none", 1, cache_bytes=400, peak_allocated=4 * 2**20, peak_rss=10 * 2**20),
          _m("quanto4", 1, cache_bytes=100, peak_allocated=3 * 2**20, peak_rss=9 * 2**20),
          _m("hqq4", 1, cache_bytes=100, peak_allocated=2 * 2**20, peak_rss=9 * 2**20)]
    found = experiment.ratios(ms, ("peak_allocated", "cache_bytes"))
    stored = baseline_file.BaselineFile(tmp_path / "x.json", "cpu-tiny", "", {})
    verdicts = [comparison.compare(stored, r.backend, r.batch, r.metric, r.value) for r in found]
    text = report.table(scenario, ms, found, verdicts)
    assert "quanto4" in text and " 0.750 " in text and " 0.500 " in text and "0.250" in text
    assert "no baseline yet" in text
    # the breakdown: weights+inputs (before_bytes=100) + cache + transient = peak allocated
    row = next(r for r in report.rows(scenario, ms, found, verdicts) if r["backend"] == "hqq4")
    assert row["before_mib"] + row["cache_mib"] + row["transient_mib"] == pytest.approx(2.0)
    paths = report.write_outputs(tmp_path / "out", scenario, ms, found, verdicts)
    assert json.loads(paths[0].read_text())["scenario"] == "cpu-tiny"
    assert "quanto4" in paths[1].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_update_writes_provenance_and_only_measured_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(baseline_file, "BASELINE_DIR", tmp_path)
    scenario = scenarios.get("cpu-tiny")
    ms = [_m("none", 1, cache_bytes=400), _m("quanto4", 1, cache_bytes=100)]
    found = experiment.ratios(ms, ("cache_bytes",))
    lines = experiment.update_baselines(scenario, ms, found, run_failed=False)
    assert lines == ["quanto4/b1/cache_bytes: new -> 0.250"]
    entry = baseline_file.load(tmp_path / "cpu-tiny.json").entries["quanto4/b1/cache_bytes"]
    assert set(entry.produced_by) >= {"versions", "device", "settings", "date", "source"}
    assert entry.produced_by["versions"]["transformers"] == __import__("transformers").__version__
    with pytest.raises(baseline_file.BaselineError):
        experiment.update_baselines(scenario, ms, found, run_failed=True)


def _fake_cuda(monkeypatch, counters, stats, calls):
    """A recording stand-in for torch.cuda's memory counters (no GPU here); ``stats``:
    the successive memory_stats() dicts (before, after)."""
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name: calls.append(_n))
    for name, value in counters.items():
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, _v=value: calls.append(_n) or _v)
    seq = iter(stats)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a: next(seq))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (7 * 2**30, 80 * 2**30))
    monkeypatch.setattr(memory, "_nvml_used", lambda index: (None, ""))


def test_cuda_probe_resets_peaks_before_and_reads_them_after(monkeypatch):
    """On a stand-in for torch.cuda: the cache is emptied and peaks reset at start; each metric
    comes from its own counter; retries and OOMs are what generate() added (cumulative)."""
    calls = []
    counters = {"memory_allocated": 5, "max_memory_reserved": 70, "max_memory_allocated": 60, "memory_reserved": 50}
    _fake_cuda(monkeypatch, counters, [{"num_alloc_retries": 2, "num_ooms": 1},
                                       {"num_alloc_retries": 2, "num_ooms": 1}], calls)
    probe = memory.CudaProbe()
    assert probe.start() == 5
    assert calls.index("empty_cache") < calls.index("reset_peak_memory_stats") < calls.index("memory_allocated")
    assert probe.stop() == {"peak_reserved": 70, "peak_allocated": 60, "reserved_after": 50,
                            "alloc_retries": 0, "ooms": 0, "device_free_after": 7 * 2**30,
                            "device_total": 80 * 2**30}


def test_a_saw_tooth_run_is_flagged(monkeypatch):
    """The seed's none run on an 80 GB card hit capacity and retried: 3 retries during generate
    are flagged SAW-TOOTH; without retries the same numbers are not."""
    from kvcache_repro.measure import reserved

    gib = 2**30
    counters = {"memory_allocated": 15 * gib, "max_memory_reserved": 79 * gib, "max_memory_allocated": 42 * gib,
                "memory_reserved": 56 * gib}
    _fake_cuda(monkeypatch, counters, [{"num_alloc_retries": 4}, {"num_alloc_retries": 7}], [])
    probe = memory.CudaProbe()
    probe.start()
    metrics = probe.stop()
    assert metrics["alloc_retries"] == 3 and reserved.is_saw_tooth(metrics)
    text = reserved.explain(metrics)
    assert "SAW-TOOTH: 3 allocation retries" in text and "37.00 GiB cached free blocks" in text, text
    assert "SAW-TOOTH" not in reserved.explain({**metrics, "alloc_retries": 0})


def _fake_pynvml(monkeypatch, **functions):
    fake = types.ModuleType("pynvml")
    fake.NVMLError = type("NVMLError", (Exception,), {})
    fake.__dict__.update(functions)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_nvml_failure_is_a_note_not_a_failed_row(monkeypatch):
    """Any NVML error (not only a missing module) leaves the NVML figure out with a note."""
    def init():
        raise fake.NVMLError("Driver/library version mismatch")

    fake = _fake_pynvml(monkeypatch, nvmlInit=init)
    value, note = memory._nvml_used(0)
    assert value is None and "Driver/library version mismatch" in note


def test_nvml_finds_the_device_by_uuid_not_by_index(monkeypatch):
    """torch's index 0 under CUDA_VISIBLE_DEVICES=3 is NVML's device 3: the handle comes
    from the UUID torch reports."""
    _fake_pynvml(monkeypatch, nvmlInit=lambda: None,
                 nvmlDeviceGetHandleByIndex=lambda i: pytest.fail("looked up by index"),
                 nvmlDeviceGetHandleByUUID=lambda u: {"GPU-abc": "h3"}[u],
                 nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used={"h3": 123}[h]))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid="abc"))
    assert memory._nvml_used(0) == (123, "")


# ---- the CUDA allocator's configuration and its expandable segments, replayed -----------

def test_the_allocator_configuration_is_read_and_expandable_segments_is_the_workers_default():
    from kvcache_repro.measure import reserved

    assert reserved.allocator_config({}) == reserved.DEFAULT
    assert reserved.allocator_config({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}) == reserved.EXPANDABLE
    assert reserved.allocator_config({"PYTORCH_ALLOC_CONF": "expandable_segments:true"}) == reserved.EXPANDABLE
    assert reserved.allocator_config({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}) == reserved.DEFAULT
    assert reserved.allocator_config({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # the newer name wins
                                      "PYTORCH_ALLOC_CONF": "expandable_segments:False"}) == reserved.DEFAULT
    assert reserved.allocator_config(
        {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:True"}
    ) == "expandable_segments:True,max_split_size_mb:128"
    # a CUDA worker gets expandable segments unless the environment already chose
    assert reserved.worker_env("cuda", {}) == {"PYTORCH_CUDA_ALLOC_CONF": reserved.EXPANDABLE}
    assert reserved.worker_env("cuda", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}) == {}
    assert reserved.worker_env("cpu", {}) == {}


def test_the_replay_follows_the_allocator_s_rules():
    """Hand-worked sequences (MiB) under torch's rules (docs/gpu.md): a 31 MiB request does not
    fit a freed 30 MiB block and maps two more 20 MiB pages; a smaller one splits the hole; freed
    neighbours merge; small requests share 2 MiB pages; a remainder of 512 B or more is split off
    in either pool; the free tail is passed over when an inner block fits."""
    from kvcache_repro.measure import reserved

    M = 2**20
    assert reserved.replay([(1, 30 * M), (2, 30 * M), (1, 0), (3, 31 * M)]) == (61 * M, 100 * M)
    assert reserved.replay([(1, 30 * M), (2, 30 * M), (1, 0), (3, 29 * M)]) == (60 * M, 60 * M)
    assert reserved.replay([(1, 10 * M), (2, 10 * M), (3, 10 * M), (1, 0), (2, 0), (4, 20 * M)]) == (
        30 * M, 40 * M)  # 1 and 2 merged into one 20 MiB hole
    assert reserved.replay([(k, 4096) for k in range(1000)]) == (4096 * 1000, 2 * M * 2)  # 512 a page
    # 19.5 MiB in a 20 MiB page: the 0.5 MiB left is split off as the free tail, which a 20.4 MiB
    # request joins (one more page, not two); a 0.5 MiB request goes to the small pool's own page
    assert reserved.replay([(1, 19.5 * M), (2, 20.4 * M)]) == (19.5 * M + reserved.round_up(20.4 * M, 512), 40 * M)
    assert reserved.replay([(1, 19.5 * M), (2, M // 2)]) == (20 * M, 22 * M)
    # a 3 MiB request takes the freed 15 MiB inner block, not the 3 MiB free tail (whose size counts
    # the unmapped space after it); the 14 MiB one then grows the tail by a page
    assert reserved.replay([(1, 15 * M), (2, 2 * M), (1, 0), (3, 3 * M), (4, 14 * M)]) == (19 * M, 40 * M)
    assert reserved.replay([(1, 10 * M)], scale=3, before=5 * M) == (35 * M, 40 * M)


def test_the_tracker_s_trace_replays_to_its_own_peak():
    """The allocation sequence a PeakTracker records (created, freed, in order) gives back its
    peak of live bytes in the replay (to the allocator's 512-byte rounding)."""
    from kvcache_repro.measure import peak, reserved

    trace = []
    with peak.PeakTracker(trace) as t:
        a = torch.ones(1_000_000)
        b = torch.cat([a, a])
        del a
        c = b * 2  # noqa: F841
        del b
    assert {size for _, size in trace if size} == {4_000_000, 8_000_000}
    assert sum(1 for _, size in trace if not size) == 2  # a and b freed inside
    live_peak, _ = reserved.replay(trace)
    assert live_peak == t.peak == 16_000_000  # b and c
