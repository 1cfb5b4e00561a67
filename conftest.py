"""The card's fixtures: a test that asks for ``family``, ``backend``, ``quantized_backend``,
``group_wise_backend`` or ``batch_size`` runs over model families x cache backends x batch
sizes as --kv-models, --kv-backends, --kv-batch-sizes narrow them (ids such as
``llama-quanto4-b200``); ``gpu_row``, ``quantized_gpu_row`` or ``large_batch_gpu_row`` over
the GPU memory scenarios' models x backends x batch sizes (ids such as
``seed-arch-short-quanto4-b200``, marked gpu; their CPU dry runs unmarked). Everything else
is the suite's pytest plugin, kvcache_repro/plugin/."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

pytest_plugins = ["kvcache_repro.plugin"]


def pytest_generate_tests(metafunc):
    from kvcache_repro.plugin.options import gpu_rows, selection

    families, backends, batch_sizes = selection(metafunc.config)
    rows = gpu_rows(metafunc.config) if {"gpu_row", "quantized_gpu_row", "large_batch_gpu_row"} & set(
        metafunc.fixturenames) else []
    quantized = [r for r in rows if r.values[0].backend != "none"]
    axes = {
        "family": (families, None),
        "backend": (backends, [b.name for b in backends]),
        "quantized_backend": (q := [b for b in backends if b.quantized], [b.name for b in q]),
        "group_wise_backend": (g := [b for b in backends if b.group_wise], [b.name for b in g]),
        "batch_size": (batch_sizes, [f"b{b}" for b in batch_sizes]),
        "gpu_row": (rows, None),
        "quantized_gpu_row": (quantized, None),
        "large_batch_gpu_row": ([r for r in quantized if r.values[0].largest], None),
    }
    for name, (values, ids) in axes.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=ids)
