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
    group.addoption("--kv-gpu-model", default=None,
                    help="checkpoint id or local path for the GPU `seed` scenario (default: the seed's)")
    group.addoption("--kv-update-baselines", action="store_true",
                    help="rewrite the baseline entries this run measured (refused for a failed run)")
    group.addoption("--kv-run-slow", action="store_true",
                    help="run tests marked slow (the full CPU-scale memory experiment, ~6 min)")


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

    skip_slow = pytest.mark.skip(reason="slow: run with --kv-run-slow, or ./kvq experiment")
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--kv-run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The seed's table for every memory scenario this session ran; baseline updates."""
    runs = getattr(config, "_kv_experiment_runs", {})
    if not runs:
        return
    from kvcache_repro import experiment, report

    terminalreporter.section("KV-cache memory experiment")
    for run in runs.values():
        terminalreporter.write_line(f"scenario {run.scenario.name}: {run.scenario.notes}")
        terminalreporter.write_line(report.table(run.scenario, run.measurements, run.ratios, run.verdicts))
        terminalreporter.write_line("")
    if config.getoption("--kv-update-baselines"):
        # A band miss is what an update is for; any other failure means the run is not
        # trustworthy enough to become a baseline.
        failed = any(name != "test_ratios_within_baseline_bands" for name in getattr(config, "_kv_failed", ()))
        for run in runs.values():
            try:
                lines = experiment.update_baselines(run.scenario, run.measurements, run.ratios, run_failed=failed)
            except ValueError as error:  # BaselineError: refused, the file is untouched
                terminalreporter.write_line(f"baselines {run.scenario.name} NOT updated: {error}")
                continue
            for line in lines:
                terminalreporter.write_line(f"baseline {run.scenario.name}: {line}")



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        failed = getattr(item.config, "_kv_failed", set())
        failed.add(getattr(item, "originalname", item.name))
        item.config._kv_failed = failed
