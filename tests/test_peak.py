"""The exact peak-memory probe (kvcache_repro/measure/peak.py): known allocations to the
byte, storages rather than views or dense sizes, frees followed, the same bytes run after
run and at 1 or 2 threads (so peak ratios take bands of a fraction of a percent)."""
from __future__ import annotations

import pytest
import torch

from kvcache_repro.measure import accounting
from kvcache_repro.backends import caches, generation
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.backends.models import tiny_model
from kvcache_repro.measure.peak import PeakTracker, storage_bytes

SETTINGS = caches.QuantSettings(q_group_size=32, residual_length=16)


def test_a_known_allocation_is_seen_to_the_byte():
    with PeakTracker() as t:
        a = torch.empty(1000)  # 4000 bytes
        view = a.view(10, 100)  # no new storage
        b = torch.zeros(10, dtype=torch.float64)  # 80 bytes, freed below
        del b
        a.add_(1)  # in place: no new storage
    assert (t.peak, t.live) == (4080, 4000)
    del a, view
    assert t.live == 0  # frees are followed after the region too


@pytest.mark.parametrize("make", [
    lambda a: torch.add(a, a, out=torch.empty(0)),  # an out= op grows an empty result: a new block
    lambda a: torch.add(a, a, out=torch.empty(10)),  # ... and frees the 40 bytes it had
    lambda a: torch.empty(10).resize_(1000),
    lambda a: torch.tensor([1.0] * 1000),  # made outside any op, seen only as lift_fresh's result
], ids=["out-grows-empty", "out-grows", "resize", "torch.tensor"])
def test_storage_grown_in_place_or_made_from_data_is_counted(make):
    a = torch.ones(1000)
    with PeakTracker() as t:
        kept = make(a)
    assert (t.peak, t.live, kept.untyped_storage().nbytes()) == (4000, 4000, 4000)
    del kept
    assert t.live == 0


def test_tensors_alive_before_the_region_are_not_counted_when_an_op_returns_them():
    w, x = torch.randn(64, 32), torch.ones(8, 32)
    with PeakTracker() as t:
        wt = w.t()  # a view of a pre-existing storage, as linear() does with a weight
        y = x @ wt  # 8 x 64 floats = 2048 bytes
    assert t.peak == 2048, t.peak
    del y


def test_quantized_tensor_subclasses_count_their_packed_storage_not_the_dense_size():
    x = torch.randn(1, 2, 32, 16)
    with PeakTracker() as t:
        qstate, restored = caches.quantize_once(BACKENDS["quanto4"], SETTINGS, x)
    packed = accounting.tensor_bytes(qstate)
    assert packed < x.nbytes // 4  # the dense size would be 4x more
    assert t.live - restored.nbytes == storage_bytes([qstate]) == packed


def _generate_peak(backend: str, extra_bytes: int = 0, batch: int = 4, new: int = 40) -> tuple[int, int]:
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (batch, 8), generator=torch.Generator().manual_seed(0))
    tracker = PeakTracker()
    tracker.ignore(list(model.parameters()) + list(model.buffers()) + [ids])
    with tracker:
        held = torch.ones(extra_bytes // 4) if extra_bytes else None
        run = generation.generate(model, ids, BACKENDS[backend], SETTINGS, new, keep_scores=False)
    del held
    return tracker.peak, accounting.cache_bytes(run.cache).total


@pytest.mark.parametrize("backend_name", ["none", "quanto4", "hqq4"])
def test_an_extra_full_precision_copy_of_the_cache_raises_the_peak_by_its_size(backend_name):
    """A copy of the unquantized cache held through generate() moves the peak by its bytes."""
    _, dense_cache = _generate_peak("none")
    clean, _ = _generate_peak(backend_name)
    with_copy, _ = _generate_peak(backend_name, extra_bytes=dense_cache)
    assert with_copy - clean == dense_cache


@pytest.mark.parametrize("backend_name", ["none", "quanto4", "hqq4"])
def test_peak_is_identical_across_runs_and_thread_counts(backend_name):
    before = torch.get_num_threads()
    try:
        peaks = []
        for threads in (1, 1, 1, 2):
            torch.set_num_threads(threads)
            peaks.append(_generate_peak(backend_name))
    finally:
        torch.set_num_threads(before)
    assert len(set(peaks)) == 1, peaks


def test_the_peak_covers_the_cache_and_more():
    """The peak holds the final cache plus the step's transients: strictly above the cache."""
    for backend in ("none", "quanto4", "hqq4"):
        peak, cache = _generate_peak(backend)
        assert peak > cache > 0, (backend, peak, cache)


def test_scenario_peaks_are_identical_in_any_order(experiment_runs):
    """cpu-tiny's exact metrics, measured here twice more in shuffled orders of (backend,
    batch): the session's bytes, so what ran before cannot move a baseline ratio."""
    import random

    from kvcache_repro.measure import memory, scenarios
    from kvcache_repro.runner import experiment

    scenario = scenarios.get("cpu-tiny")
    loaded = memory.load_model(scenario)
    keys = [(b, n) for n in scenario.batch_sizes for b in scenario.backends]  # 6 runs, ~1 s each
    seen = [{(m.backend, m.batch): (m.metrics["peak_allocated"], m.metrics["cache_bytes"])
             for m in experiment_runs("cpu-tiny").measurements}]
    for seed in (1, 2):
        order = keys[:]
        random.Random(seed).shuffle(order)
        ms = {(b, n): experiment.measure_in_process(scenario, b, n, loaded) for b, n in order}
        seen.append({k: (m.metrics["peak_allocated"], m.metrics["cache_bytes"]) for k, m in ms.items()})
    assert seen[0] == seen[1] == seen[2], seen
