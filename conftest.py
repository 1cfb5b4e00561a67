"""The card's fixtures: a test that asks for ``family``, ``backend``, ``quantized_backend``,
``group_wise_backend`` or ``batch_size`` runs over model families x cache backends x batch
sizes as --kv-models, --kv-backends, --kv-batch-sizes narrow them (ids such as
``llama-quanto4-b200``). Everything else is the suite's pytest plugin, kvcache_repro/plugin/."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

pytest_plugins = ["kvcache_repro.plugin"]


def pytest_generate_tests(metafunc):
    from kvcache_repro.plugin.options import selection

    families, backends, batch_sizes = selection(metafunc.config)
    axes = {
        "family": (families, None),
        "backend": (backends, [b.name for b in backends]),
        "quantized_backend": (q := [b for b in backends if b.quantized], [b.name for b in q]),
        "group_wise_backend": (g := [b for b in backends if b.group_wise], [b.name for b in g]),
        "batch_size": (batch_sizes, [f"b{b}" for b in batch_sizes]),
    }
    for name, (values, ids) in axes.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=ids)
