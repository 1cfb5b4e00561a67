"""The options that narrow the matrix, the checks made before any test, and the gates: gpu,
slow, and backends the installed releases refuse."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest

from kvcache_repro.backends import matrix
from kvcache_repro.core import provenance
from kvcache_repro.plugin import state


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
                    help="your model (hub id or local directory) for the gpu-marked `model` scenario: the seed's "
                         "protocol on it, baselines of its own in baselines/models/ (./kvq experiment --model)")
    group.addoption("--kv-model", default=None,
                    help="your model (hub id or local directory) on the CPU: the `model-cpu` scenario, memory, "
                         "accuracy and speed of each backend (./kvq experiment --model X --device cpu), baselines "
                         "of its own recorded by a first run")
    group.addoption("--kv-gpu-weights", default="native", choices=("native", "nf4"),
                    help="with --kv-gpu-model: native (default) or nf4 weights (bitsandbytes)")
    group.addoption("--kv-gpu-dtype", default="fp16", choices=("fp16", "bf16", "fp32"),
                    help="with --kv-gpu-model: the compute dtype (default fp16, the seed's)")
    group.addoption("--kv-gpu-new-tokens", default=1000, type=int,
                    help="with --kv-gpu-model: new tokens per prompt (default 1000, the seed's)")
    group.addoption("--kv-gpu-batch-sizes", default="1,200",
                    help="with --kv-gpu-model: comma-separated batch sizes (default 1,200, the seed's)")
    group.addoption("--kv-update-baselines", action="store_true",
                    help="rewrite the baseline entries this run measured (refused for a failed run); "
                         "stored bands are kept")
    group.addoption("--kv-reset-tolerances", action="store_true",
                    help="with --kv-update-baselines: write default bands even where an entry has one")
    group.addoption("--kv-accept-release", default=None, choices=provenance.PACKAGES, metavar="PACKAGE",
                    help="store each band miss of this run as the value of the installed release line of PACKAGE "
                         "(a per-release range; ./kvq compat --accept runs it in a release's environment); "
                         "refused for a run with any other failure")
    group.addoption("--kv-record-timings", action="store_true",
                    help="store this run's seconds per test file as the recorded ones "
                         "(baselines/timings/recorded.json; every run prints its own beside them)")
    group.addoption("--kv-run-slow", action="store_true",
                    help="run tests marked slow (the full CPU memory scenario ~5 min in one process, "
                         "the full accuracy table ~3 min; with -m gpu: seed-arch, 15 GiB of weights x 200 x 1000 "
                         "tokens, ~5 min predicted on an H100, and seed, which downloads its ~16 GB checkpoint)")


def selection(config) -> tuple:
    """(families, backends, batch sizes) as the options narrow them, validated once per session."""
    if state.SELECTION not in config.stash:
        from kvcache_repro.backends import caches

        try:
            config.stash[state.SELECTION] = (
                matrix.select_families(config.getoption("--kv-models")),
                matrix.select_backends(config.getoption("--kv-backends"), caches.available_backends()),
                matrix.select_batch_sizes(config.getoption("--kv-batch-sizes")),
            )
        except matrix.SelectionError as error:
            raise pytest.UsageError(str(error)) from None
    return config.stash[state.SELECTION]


# ---- the GPU memory rows: model x backend x batch ----------------------------------------
# Every built-in memory scenario runs a Llama architecture (offline.ARCHS are LlamaConfigs, the
# tiny model is a llama, the seed is Llama-3): --kv-models without llama drops them.
SCENARIO_FAMILY = "llama"


class GpuRow(NamedTuple):
    scenario: str
    backend: str
    batch: int
    largest: bool  # the scenario's largest batch (as narrowed)


def narrowed(config, scenario):
    """A CUDA scenario (or its dry run) as --kv-backends and --kv-batch-sizes narrow it, where
    given: none is always kept (every ratio divides by it); a dry run keeps its one batch.
    None when no batch size is left."""
    from dataclasses import replace

    from kvcache_repro.measure import scenarios

    gpu = scenario.device == "cuda" or scenario.name.endswith(scenarios.DRY_SUFFIX)
    if not gpu or scenario.baseline_key is not None:  # a --kv-gpu-model scenario is built from the options
        return scenario
    backends, batches = config.getoption("--kv-backends"), config.getoption("--kv-batch-sizes")
    keep = {b.name for b in selection(config)[1]} | {"none"} if backends else set(scenario.backends)
    sizes = set(selection(config)[2]) if batches and scenario.device == "cuda" else set(scenario.batch_sizes)
    kept = tuple(b for b in scenario.batch_sizes if b in sizes)
    return replace(scenario, backends=tuple(b for b in scenario.backends if b in keep),
                   batch_sizes=kept) if kept else None


def gpu_rows(config) -> list:
    """pytest params of every (scenario, backend, batch) of the CUDA memory scenarios (marked
    gpu; slow ones, seed and seed-arch, only with --kv-run-slow) and of their dry runs (the CPU
    tier), ids such as ``seed-arch-short-quanto4-b200``, as --kv-models/--kv-backends/
    --kv-batch-sizes narrow them; --kv-gpu-model X: X's rows only (``model-...``)."""
    from kvcache_repro.measure import scenarios
    from kvcache_repro.plugin.kinds import USER_MODEL

    families, _, _ = selection(config)
    rows = []
    if config.getoption("--kv-gpu-model"):  # the rows model_scenario builds (it refuses a selection without none)
        from kvcache_repro.runner.scenario_choice import model_backends

        try:
            backends = model_backends(config.getoption("--kv-backends"))
            sizes = matrix.select_batch_sizes(config.getoption("--kv-gpu-batch-sizes"), (1, 200))
        except matrix.SelectionError as error:
            raise pytest.UsageError(str(error)) from None
        rows = [(GpuRow(USER_MODEL, b, n, n == max(sizes)), ("gpu",)) for n in sizes for b in backends]
    elif SCENARIO_FAMILY in families:
        from kvcache_repro.gpu import device_run

        dry = device_run.stored_dry_run()  # ./kvq device-run --dry-run: each scenario's rows are its dry run's
        names = [(n, marks) for n, marks in scenarios.for_tests("experiment") if "gpu" in marks]
        names += [(n + scenarios.DRY_SUFFIX, ()) for n, _ in scenarios.for_tests("experiment-dry")]
        for name, marks in names:
            s = narrowed(config, scenarios.get(name + scenarios.DRY_SUFFIX * (dry and "gpu" in marks)))
            rows += [(GpuRow(name, b, n, n == s.large_batch), marks) for n in s.batch_sizes
                     for b in s.backends] if s else []
    return [pytest.param(row, id=f"{row.scenario}-{row.backend}-b{row.batch}",
                         marks=[getattr(pytest.mark, m) for m in marks]) for row, marks in rows]


def gpu_plan_note(config) -> str | None:
    """Under -m gpu: the CUDA scenarios this run measures and each one's predicted time on an
    H100 (gpu/plan.py planned_seconds: a model, not a measurement)."""
    expr = getattr(config.option, "markexpr", "") or ""
    if "gpu" not in expr or "not gpu" in expr or config.getoption("--kv-gpu-model"):
        return None
    from kvcache_repro.measure import scenarios
    from kvcache_repro.gpu.plan import planned_seconds

    run_slow, parts, total = config.getoption("--kv-run-slow"), [], 0.0
    for name, marks in scenarios.for_tests("experiment"):
        if "gpu" not in marks:
            continue
        seconds = planned_seconds(scenarios.get(name))
        said = f"~{seconds:.0f} s" if seconds is not None else "not predicted (a hub download first)"
        if "slow" in marks and not run_slow:
            parts.append(f"{name} {said} (--kv-run-slow)")
            continue
        total += seconds or 0.0
        parts.append(f"{name} {said}")
    return (f"kvq: GPU plan, predicted for an H100 (not measured; gpu/plan.py): "
            f"{'; '.join(parts)}; this selection ~{total / 60:.1f} min, plus the accuracy tables where the "
            f"small real model is installed (not predicted)")


def _benchmark_defaults(config) -> None:
    """pytest-benchmark, where installed (a CUDA box's own Python may lack it: then not in
    pytest.ini, which it would refuse): process time (wall time here is the other core's noise)
    and every timed run kept in .benchmarks/ (compare: -m benchmark -p no:xdist
    --benchmark-compare), unless the command line says otherwise. Its own pytest_configure
    (trylast) reads them after this one."""
    if not config.pluginmanager.has_plugin("benchmark"):
        return
    from pytest_benchmark.utils import get_tag, parse_timer

    given = " ".join([*map(str, config.invocation_params.args), os.environ.get("PYTEST_ADDOPTS", "")])
    if "--benchmark-timer" not in given:
        config.option.benchmark_timer = parse_timer("time.process_time")
    if "--benchmark-autosave" not in given and "--benchmark-save" not in given:
        config.option.benchmark_autosave = get_tag()


def pytest_configure(config):
    if not state.suite_run(config):
        return
    _benchmark_defaults(config)
    import kvcache_repro

    if (imported := Path(kvcache_repro.__file__).resolve().parents[1]) != config.rootpath.resolve():
        raise pytest.UsageError(f"kvcache_repro is imported from {imported}, not from this checkout "
                                f"({config.rootpath}): its baselines would be missing. Install the checkout "
                                "editable (pip install -e .) or uninstall kvcache-repro")
    from kvcache_repro.backends import quanto_ext, quanto_unpack
    from kvcache_repro.measure import threads
    from kvcache_repro.verdicts import expectations

    try:
        threads.pin()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    # ... and every torch subprocess a test starts: unpinned, OpenMP took both cores beside the
    # other xdist worker (a 3-generate script of the tiny model took 47 s).
    os.environ.setdefault("OMP_NUM_THREADS", str(threads.configured()))
    try:  # a stale quanto build lock stops the session with its fix, not the first quanto test
        quanto_ext.prepare()
        config.stash[state.QUANTO_NOTE] = quanto_unpack.install_if_requested()  # KVQ_QUANTO_PY_UNPACK=1
        expectations.current_range()
    except (quanto_ext.StaleLockError, expectations.UnsupportedVersion) as error:
        raise pytest.UsageError(str(error)) from None
    if expectations.ACCEPTED_ERROR:  # a corrupt baselines/expectations.json: named, never half-applied
        raise pytest.UsageError(expectations.ACCEPTED_ERROR)
    selection(config)
    for option in ("--kv-update-baselines", "--kv-accept-release"):
        if config.getoption(option) and state.xdist_controller(config):
            raise pytest.UsageError(f"{option} needs every measurement and test outcome in one "
                                    "process: run it without xdist (add -n 0)")


def pytest_report_header(config):
    if not state.suite_run(config):
        return []
    from kvcache_repro.gpu import devices
    from kvcache_repro.plugin import DEVICE_NOTE

    notes = [config.stash.get(state.QUANTO_NOTE, None), DEVICE_NOTE, gpu_plan_note(config)]
    if state.xdist_controller(config):  # a worker's header is never printed: say what each one takes
        workers = len(getattr(config.option, "tx", None) or ())  # xdist sets it to -n's popen specs
        notes.append(devices.plan_note(workers, os.environ.get("CUDA_VISIBLE_DEVICES")))
    return [note for note in notes if note]


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the xdist_group marks added here
def pytest_runtest_setup(item):
    """A test of a backend whose cache transformers refuses to build with the installed
    quantizer (caches.refused_backends) skips, naming the test that reports the refusal; one
    that needs a backend --kv-backends leaves out skips, saying so."""
    if not state.suite_run(item.config):
        return
    params = getattr(getattr(item, "callspec", None), "params", {})
    specs = [v if isinstance(v, matrix.BackendSpec) else matrix.BACKENDS.get(v) if isinstance(v, str)
             else matrix.BACKENDS.get(v.backend) if isinstance(v, GpuRow) else None for v in params.values()]
    needed = [name for mark in item.iter_markers("needs_backends") for name in mark.args]
    if item.config.getoption("--kv-backends") and (left := set(needed) - {b.name for b in selection(item.config)[1]}):
        pytest.skip(f"needs {', '.join(sorted(left))}, left out by --kv-backends")
    specs += [matrix.BACKENDS[name] for name in needed]
    specs = [s for s in specs if s is not None and s.quantized]
    if not specs:
        return
    from kvcache_repro.backends import caches

    refused = caches.refused_backends()
    for spec in specs:
        if spec.backend in refused:
            pytest.skip(f"{spec.name}: transformers refuses the installed {spec.backend} release "
                        "(test_version_expectations.py::test_transformers_builds_a_cache_with_the_installed_quantizer)")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns the xdist_group marks added here into
def pytest_collection_modifyitems(config, items):  # nodeid suffixes: after it, every test was its own group
    if not state.suite_run(config):
        return
    import torch

    from kvcache_repro.gpu import device_run
    from kvcache_repro.plugin.kinds import KINDS

    skip_slow = pytest.mark.skip(reason="slow (minutes): run with --kv-run-slow")
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    groups = {kind.fixture: kind.xdist_group for kind in KINDS}
    stored_dry = device_run.stored_dry_run()  # ./kvq device-run --dry-run: gpu tests check its CPU runs
    for item in items:
        group = next((g for f, g in groups.items() if f in getattr(item, "fixturenames", ())), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
        if "slow" in item.keywords and not config.getoption("--kv-run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available() and not stored_dry:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        item.config.stash.setdefault(state.FAILED, set()).add(getattr(item, "originalname", item.name))


@pytest.fixture(autouse=True)
def _no_dispatch_mode_outlives_a_test(request):
    """A test that leaves a TorchDispatchMode on (a PeakTracker whose region raised) errors here
    and the mode is popped, so that it does not wrap (and slow, 6x) every later test."""
    yield
    if not state.suite_run(request.config):
        return
    from kvcache_repro.measure import peak

    if left := peak.pop_leftover_modes():
        pytest.fail(f"the test left {', '.join(left)} active as a torch dispatch mode (a measured region that "
                    "raised without ending it); popped so that later tests run outside it", pytrace=False)
