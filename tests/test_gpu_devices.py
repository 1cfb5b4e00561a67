"""The device each pytest-xdist worker gets (kvcache_repro.gpu.devices), chosen before CUDA
initialises: an existing CUDA_VISIBLE_DEVICES is split verbatim, one GPU is shared, a second
call keeps the narrowed value; ``./kvq gpu`` installs requirements-gpu.txt once. No GPU
needed: GPU counts are fakes."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from kvcache_repro.gpu import devices

ROOT = Path(__file__).resolve().parent.parent


def never_counted() -> int:
    raise AssertionError("count() called although CUDA_VISIBLE_DEVICES was set")


def counts(n: int):
    return lambda: n


def worker_env(worker: str, workers: int, **extra: str) -> dict:
    return {"PYTEST_XDIST_WORKER": worker, "PYTEST_XDIST_WORKER_COUNT": str(workers), **extra}


def test_a_set_list_is_split_among_the_workers_without_counting():
    assert [devices.assign(i, 2, "2,3", never_counted) for i in range(2)] == ["2", "3"]


def test_uuids_are_kept_verbatim():
    visible = "MIG-4b1e3c2a-0000-5c6d-8e9f-0123456789ab, GPU-aa11bb22-cc33-dd44-ee55-ff6677889900"
    assert devices.assign(0, 2, visible, never_counted) == "MIG-4b1e3c2a-0000-5c6d-8e9f-0123456789ab"
    assert devices.assign(1, 2, visible, never_counted) == "GPU-aa11bb22-cc33-dd44-ee55-ff6677889900"


def test_more_workers_than_devices_share_them():
    assert [devices.assign(i, 2, None, counts(1)) for i in range(2)] == ["0", "0"]
    assert [devices.assign(i, 3, "5", never_counted) for i in range(3)] == ["5", "5", "5"]
    assert [devices.assign(i, 3, "2,3", never_counted) for i in range(3)] == ["2", "3", "2"]


def test_unset_gets_the_counted_indices():
    assert [devices.assign(i, 2, None, counts(4)) for i in range(2)] == ["0", "1"]


def test_no_gpu_counted_leaves_it_unset():
    assert devices.assign(0, 2, None, counts(0)) is None
    env = worker_env("gw1", 2)
    assert devices.apply_for_xdist_worker(env, counts(0)) is None
    assert env == worker_env("gw1", 2)


@pytest.mark.parametrize("visible", ["", "-1", " "])
def test_an_explicit_no_gpu_is_left_alone(visible):
    assert devices.assign(1, 2, visible, never_counted) is None
    env = worker_env("gw1", 2, CUDA_VISIBLE_DEVICES=visible)
    assert devices.apply_for_xdist_worker(env, never_counted) is None
    assert env == worker_env("gw1", 2, CUDA_VISIBLE_DEVICES=visible)


def test_a_single_worker_keeps_everything():
    assert devices.assign(0, 1, "2,3", never_counted) is None
    env = worker_env("gw0", 1, CUDA_VISIBLE_DEVICES="2,3")
    assert devices.apply_for_xdist_worker(env, never_counted) is None
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and devices.ORIGINAL_ENV not in env


def test_outside_xdist_nothing_changes():
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert devices.apply_for_xdist_worker(env, never_counted) is None
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_a_worker_takes_its_entry_and_records_the_original():
    env = worker_env("gw1", 2, CUDA_VISIBLE_DEVICES="2,3")
    note = devices.apply_for_xdist_worker(env, never_counted)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env[devices.ORIGINAL_ENV] == "2,3"
    assert note == "kvq: xdist worker gw1 of 2: CUDA_VISIBLE_DEVICES=3 (of CUDA_VISIBLE_DEVICES=2,3)"


def test_one_gpu_two_workers_both_get_it_and_say_it_is_shared():
    env = worker_env("gw1", 2)  # the old conftest gave gw1 "1": no GPU at all
    note = devices.apply_for_xdist_worker(env, counts(1))
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env[devices.ORIGINAL_ENV] == ""
    assert note == ("kvq: xdist worker gw1 of 2: CUDA_VISIBLE_DEVICES=0 (of 1 GPU counted); "
                    "2 workers share 1 device")


def test_applying_twice_or_in_an_inheriting_process_does_not_narrow_again():
    env = worker_env("gw1", 2, CUDA_VISIBLE_DEVICES="4,5,6,7")
    devices.apply_for_xdist_worker(env, never_counted)
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    assert devices.apply_for_xdist_worker(env, never_counted) is None
    child = dict(env, PYTEST_XDIST_WORKER="gw0", PYTEST_XDIST_WORKER_COUNT="3")  # e.g. a nested pytest -n 3
    assert devices.apply_for_xdist_worker(child, never_counted) is None
    assert env["CUDA_VISIBLE_DEVICES"] == child["CUDA_VISIBLE_DEVICES"] == "5"
    assert env[devices.ORIGINAL_ENV] == "4,5,6,7"


def test_the_controller_header_shows_what_each_worker_takes():
    assert devices.plan_note(3, "2,3", never_counted) == (
        "kvq: CUDA_VISIBLE_DEVICES per xdist worker (from CUDA_VISIBLE_DEVICES=2,3): gw0=2 gw1=3 gw2=2; "
        "3 workers share 2 devices")
    assert devices.plan_note(2, None, counts(4)) == (
        "kvq: CUDA_VISIBLE_DEVICES per xdist worker (from 4 GPUs counted): gw0=0 gw1=1")
    assert devices.plan_note(2, None, counts(0)) is None
    assert devices.plan_note(1, "2,3", never_counted) is None


def test_count_gpus_runs_torch_in_a_subprocess_and_reads_its_answer(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return types.SimpleNamespace(stdout="some warning\n3\n")

    monkeypatch.setattr(devices, "_DRIVER_PATHS", (str(tmp_path),))  # a driver is "there"
    monkeypatch.setattr(devices.subprocess, "run", fake_run)
    assert devices.count_gpus() == 3
    assert calls == [[sys.executable, "-c", "import torch; print(torch.cuda.device_count())"]]

    def failing_run(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(devices.subprocess, "run", failing_run)
    assert devices.count_gpus() == 0


def test_count_gpus_without_a_gpu_driver_spawns_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices, "_DRIVER_PATHS", (str(tmp_path / "none"),))
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: pytest.fail("spawned torch, no driver"))
    assert devices.count_gpus() == 0


def test_importing_devices_imports_no_torch():
    code = "import sys; import kvcache_repro.gpu.devices; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_experiment_runs_leaves_a_workers_devices_alone(monkeypatch):
    """The fixture used to overwrite CUDA_VISIBLE_DEVICES with the worker's bare index
    (gw1 -> "1"), after CUDA was initialised and over a scheduler's assignment."""
    from kvcache_repro.plugin import kinds

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-4b1e3c2a-0000-5c6d-8e9f-0123456789ab")
    fixture = getattr(kinds.experiment_runs, "_get_wrapped_function", lambda: kinds.experiment_runs)()
    get = fixture(types.SimpleNamespace(config=types.SimpleNamespace(stash=pytest.Stash())))
    assert callable(get)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "MIG-4b1e3c2a-0000-5c6d-8e9f-0123456789ab"


def test_the_report_header_of_an_xdist_controller_has_the_plan(monkeypatch):
    from kvcache_repro.plugin import options

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    config = types.SimpleNamespace(option=types.SimpleNamespace(numprocesses=2, tx=["popen", "popen"]),
                                   stash=pytest.Stash(), rootpath=ROOT)
    assert "kvq: CUDA_VISIBLE_DEVICES per xdist worker (from CUDA_VISIBLE_DEVICES=2,3): gw0=2 gw1=3" in (
        options.pytest_report_header(config))
    one_process = types.SimpleNamespace(option=types.SimpleNamespace(numprocesses=None), stash=pytest.Stash(),
                                        rootpath=ROOT)
    assert not any("per xdist worker" in line for line in options.pytest_report_header(one_process))


def run_gpu_extras(tmp_path, *args, rc=0, system="0"):
    """kvq's gpu_extras function alone, under set -euo pipefail, with a fake venv python
    that logs its arguments and exits ``rc``."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "pip.log"}\nexit {rc}\n')
    python.chmod(0o755)
    function = subprocess.run(["sed", "-n", "/^gpu_extras() {/,/^}/p", str(ROOT / "kvq")],
                              capture_output=True, text=True, check=True).stdout
    assert function.strip().endswith("}"), function
    script = f'set -euo pipefail\nVENV={venv}\nSYSTEM={system}\n{function}\ngpu_extras "$@"\necho done\n'
    proc = subprocess.run(["bash", "-c", script, "kvq", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    log = tmp_path / "pip.log"
    return proc, (log.read_text().splitlines() if log.exists() else []), venv / ".kvq-gpu-requirements"


def test_kvq_gpu_installs_the_gpu_extras_once(tmp_path):
    proc, log, stamp = run_gpu_extras(tmp_path)
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    assert log == ["-m pip install -q -r requirements-gpu.txt -c requirements.txt"]
    assert stamp.read_text().strip()
    proc, log, _ = run_gpu_extras(tmp_path)
    assert proc.returncode == 0 and len(log) == 1, "installed again although nothing changed"


def test_a_failed_gpu_extras_install_warns_with_the_fix_and_continues(tmp_path):
    proc, log, stamp = run_gpu_extras(tmp_path, rc=1)
    assert proc.returncode == 0 and proc.stdout == "done\n"
    assert "WARNING: pip could not install requirements-gpu.txt" in proc.stderr
    assert "pip install -r requirements-gpu.txt" in proc.stderr
    assert not stamp.exists()  # the next run tries again


@pytest.mark.parametrize("args, system", [(("--dry-run",), "0"), ((), "1")])
def test_no_gpu_extras_for_system_python_or_a_dry_run(tmp_path, args, system):
    proc, log, stamp = run_gpu_extras(tmp_path, *args, system=system)
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    assert log == [] and not stamp.exists()
