"""Adding a backend is one module plus its rows: a throwaway kind registered through
matrix.register_kind (what a module listed in backends/kinds/__init__.py is at import) is in the
matrix, the analytic byte model and the experiment's report, and gone after its test."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvcache_repro.backends import kinds, matrix
from kvcache_repro.backends.kinds.base import BackendKind
from kvcache_repro.core import provenance
from kvcache_repro.measure import accounting
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.runner import report

BUILT_IN = list(matrix.BACKENDS)
MIB = 2**20


class IntSim(BackendKind):
    """8-bit codes for every token (no residual), a float32 scale per group, quanto's layers."""

    name = "int-sim"
    layer_class_name = "QuantoQuantizedLayer"
    nbits = (8,)
    axes = (0, 1)

    def predicted_bytes(self, spec, n: int, group: int, itemsize: int) -> tuple[int, int]:
        return n, 4 * (n // group)


@pytest.fixture
def int_sim():
    kind = matrix.register_kind(IntSim())
    yield kind
    matrix.unregister_kind(kind.name)
    assert list(matrix.BACKENDS) == BUILT_IN and kind.name not in kinds.KINDS


def test_its_rows_join_the_matrix_after_the_built_in_ones(int_sim):
    assert list(matrix.BACKENDS) == BUILT_IN + ["int-sim8", "int-sim8-axis1"]
    spec = matrix.BACKENDS["int-sim8-axis1"]
    assert (spec.backend, spec.nbits, spec.axis, spec.kind) == ("int-sim", 8, 1, int_sim)
    assert spec.quantized and not spec.group_wise and spec.broken is None
    assert matrix.select_backends("none,int-sim8") == [matrix.BACKENDS["none"], matrix.BACKENDS["int-sim8"]]
    with pytest.raises(matrix.SelectionError, match=r"int-sim takes 8 bits"):
        matrix.select_backends("int-sim4")
    with pytest.raises(ValueError, match="exists already"):
        matrix.register_kind(IntSim())


def test_its_byte_formula_is_the_analytic_model(int_sim):
    settings = matrix.QuantSettings(q_group_size=64, residual_length=16)
    geometry = accounting.CacheGeometry(layers=3, batch=2, kv_heads=4, head_dim=32, dtype=torch.float16)
    got = accounting.predict_cache_bytes(matrix.BACKENDS["int-sim8"], settings, geometry, prompt_len=8,
                                         total_tokens=40)
    n = 2 * 4 * 40 * 32  # one tensor: no residual, every token quantized
    assert got == accounting.CacheBytes(packed=2 * 3 * n, metadata=2 * 3 * 4 * (n // 64), residual=0)


def test_its_rows_are_in_the_report(int_sim):
    def measured(backend: str, cache: int) -> Measurement:
        return Measurement("cpu-tiny", backend, 4, "cpu", 8, 32, 1.5, 10 * MIB,
                           {"cache_bytes": cache, "peak_allocated": 10 * MIB + 2 * cache}, cache)

    rows = [measured("none", 4 * MIB), measured("int-sim8", MIB)]
    text = report.table(SimpleNamespace(device="cpu"), rows, [], [])
    row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["int-sim8"])
    # name, batch, then MiB: weights+in, cache, transient, peak
    assert row[:6] == ["int-sim8", "4", "10.00", "1.00", "1.00", "12.00"]


def test_every_quantizer_package_is_recorded_with_the_numbers():
    """core/ sits below backends/, so provenance.PACKAGES cannot be derived from the kinds."""
    assert {k.package for k in kinds.KINDS.values() if k.package} <= set(provenance.PACKAGES)
