"""Command-line options that narrow the matrix, its parametrization, the gpu gate."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from kvcache_repro import matrix  # noqa: E402  (import after the path fix above)

# Nothing in the suite may reach the hub at test time (GPU scenarios that name a hub
# checkpoint opt back in explicitly).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser):
    group = parser.getgroup("kv-cache matrix")
    group.addoption("--kv-models", default=None,
                    help=f"comma-separated model families (default all: {','.join(matrix.FAMILIES)})")
    group.addoption("--kv-backends", default=None,
                    help=f"comma-separated backends (default all available: {','.join(matrix.BACKENDS)})")
    group.addoption("--kv-batch-sizes", default=None,
                    help="comma-separated batch sizes for the tiny-model tests (default "
                         f"{','.join(map(str, matrix.DEFAULT_BATCH_SIZES))})")


def _selection(config):
    """Validated selection, computed once per session; a bad value is a usage error."""
    if not hasattr(config, "_kv_selection"):
        from kvcache_repro import caches

        try:
            config._kv_selection = (
                matrix.select_families(config.getoption("--kv-models")),
                matrix.select_backends(config.getoption("--kv-backends"), caches.available_backends()),
                matrix.select_batch_sizes(config.getoption("--kv-batch-sizes")),
            )
        except matrix.SelectionError as error:
            raise pytest.UsageError(str(error)) from None
    return config._kv_selection


def pytest_configure(config):
    _selection(config)


def pytest_generate_tests(metafunc):
    families, backends, batch_sizes = _selection(metafunc.config)
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", families)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends, ids=[b.name for b in backends])
    if "quantized_backend" in metafunc.fixturenames:
        chosen = [b for b in backends if b.quantized]
        metafunc.parametrize("quantized_backend", chosen, ids=[b.name for b in chosen])
    if "group_wise_backend" in metafunc.fixturenames:
        chosen = [b for b in backends if b.group_wise]
        metafunc.parametrize("group_wise_backend", chosen, ids=[b.name for b in chosen])
    if "batch_size" in metafunc.fixturenames:
        metafunc.parametrize("batch_size", batch_sizes, ids=[f"b{b}" for b in batch_sizes])


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
