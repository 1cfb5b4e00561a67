"""The memory experiment under interruption, hangs and out-of-memory (issue 11;
docs/interruption.md). Fast: workers that hang start hanging before importing torch (fault
``hang``); the interrupt/resume logic runs ``commands.call("experiment", ...)`` with a fake
``run_one``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvcache_repro.verdicts import baseline_file, comparison
from kvcache_repro.runner import experiment, limits
from kvcache_repro.measure import scenarios
from kvcache_repro import commands, faults
from kvcache_repro.core import metrics
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.runner.progress import Progress
from kvcache_repro.runner.rowstore import ResumeError, RowStore
from kvcache_repro.runner import worker as worker_module
from kvcache_repro.runner.worker import RowFailure

ROOT = Path(__file__).resolve().parent.parent
TINY = scenarios.get("cpu-tiny")


# ---- time limits

def test_time_limit_comes_from_the_scenario(monkeypatch):
    monkeypatch.delenv(limits.SCALE_ENV, raising=False)
    assert limits.worker_seconds(TINY) == 120 + 40 * 2.0
    assert limits.worker_seconds(scenarios.get("seed-arch")) == 120 + 1000 * 0.5
    assert limits.worker_seconds(scenarios.get("seed")) == 1800 + 1000 * 0.5  # may download the checkpoint
    monkeypatch.setenv(limits.SCALE_ENV, "2")
    assert limits.worker_seconds(TINY) == 2 * (120 + 40 * 2.0)
    monkeypatch.setenv(limits.SCALE_ENV, "0")
    with pytest.raises(ValueError, match="positive factor"):
        limits.worker_seconds(TINY)


def test_a_hung_worker_is_killed_at_its_limit_and_is_a_failed_row_with_its_last_output(tmp_path):
    outcome = {}

    def run():
        with pytest.raises(experiment.RowFailed) as outcome["caught"]:
            experiment.run_one("cpu-tiny", "none", 1, timeout=4, env={faults.ENV: "hang"},
                               log_path=tmp_path / "w.log")

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "run_one did not return: the hung worker has no time limit"
    failure = outcome["caught"].value.failure
    assert failure.kind == "timeout" and "no result after 4 s" in failure.message
    assert "KVQ_FAULT=hang - not answering" in failure.output_tail  # the worker's last words
    assert "cpu-tiny none b1: starting" in failure.output_tail
    pid = int(failure.output_tail.split("worker ")[-1].split(":")[0])
    assert not Path(f"/proc/{pid}").exists(), "the hung worker is still running"
    assert time.monotonic() - t0 < 30


def _shell_worker(tmp_path, monkeypatch, script: str, timeout: float) -> RowFailure:
    """run_one's RowFailure with the worker replaced by a bash ``script`` (its log: tmp_path/w.log)."""
    fake = tmp_path / "worker.sh"
    fake.write_text(f"#!/bin/bash\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(experiment.RowFailed) as caught:
        experiment.run_one("cpu-tiny", "none", 1, timeout=timeout, log_path=tmp_path / "w.log")
    return caught.value.failure


def test_a_child_that_ignores_the_term_does_not_outlive_a_stopped_worker(tmp_path, monkeypatch):
    """The worker obeys SIGTERM at once, a process it started ignores it (a build step, a helper):
    stopping the row kills the whole group, not only the worker."""
    failure = _shell_worker(tmp_path, monkeypatch, "bash -c 'trap \"\" TERM; echo grandchild $$; exec sleep 120' &\n"
                            "exec sleep 120", timeout=2)
    assert failure.kind == "timeout"
    pid = int((tmp_path / "w.log").read_text().split("grandchild ")[1].split()[0])
    time.sleep(0.2)  # SIGKILL is delivered at once; the zombie, if any, belongs to init
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else "gone"
    assert state in ("gone", "Z"), f"the child {pid} outlived the stopped worker (state {state})"


# ---- out of memory

@pytest.fixture
def oom_fault(monkeypatch):
    """The fault plugin's ``oom``, undone after the test (batches >= 200 run out of memory)."""
    from transformers.generation.utils import GenerationMixin

    monkeypatch.setattr(GenerationMixin, "generate", GenerationMixin.generate)
    monkeypatch.setenv(faults.OOM_BATCH_ENV, "200")
    faults.apply("oom")


def test_oom_at_the_large_batch_keeps_the_other_rows_and_names_what_was_not_compared(oom_fault):
    run = experiment.run_experiment(TINY, log=lambda line: None, in_process=True)
    assert sorted((m.backend, m.batch) for m in run.measurements) == [("hqq4", 1), ("none", 1), ("quanto4", 1)]
    assert sorted((f.backend, f.batch, f.kind) for f in run.failures) == [
        ("hqq4", 200, "oom"), ("none", 200, "oom"), ("quanto4", 200, "oom")]
    assert all(f.message.startswith("OOM at batch 200 on this device, ") and " GiB free of " in f.message
               for f in run.failures)
    unmeasured = {v.key for v in run.verdicts if v.status == "unmeasured"}
    assert unmeasured == {f"{b}/b200/{m}" for b in ("quanto4", "hqq4") for m in TINY.baseline_metrics
                          if m not in metrics.REFERENCE_METRICS}  # none's own, not a quantized row's
    assert not any(v.passed for v in run.verdicts if v.status == "unmeasured")
    assert all(v.passed for v in run.verdicts if v.key.split("/")[1] == "b1")  # the rest still compared
    from kvcache_repro.runner import report

    text = report.table(TINY, run.measurements, run.ratios, run.verdicts, run.failures)
    assert "FAILED (oom): OOM at batch 200 on this device" in text
    assert "baseline entries could not be measured" in text and "quanto4/b200/cache_bytes" in text
    with pytest.raises(experiment.RowNotMeasured, match="hqq4/b200 was not measured: OOM at batch 200"):
        run.get("hqq4", 200)


def test_a_worker_that_runs_out_of_memory_reports_the_oom_row():
    with pytest.raises(experiment.RowFailed) as caught:
        experiment.run_one("cpu-tiny", "hqq4", 200, timeout=120, env={faults.ENV: "oom"})
    failure = caught.value.failure
    assert failure.kind == "oom" and failure.message.startswith("OOM at batch 200 on this device, ")
    assert failure.free_bytes and failure.free_bytes > 0


# ---- interrupt and resume

def _fake(backend: str, batch: int) -> Measurement:
    cache = {"none": 4000, "quanto4": 1000, "hqq4": 1000}[backend] * batch
    return Measurement("cpu-tiny", backend, batch, "cpu", 8, 40, 0.1, 100,
                       {"cache_bytes": cache, "peak_allocated": 100 + 2 * cache, "peak_rss": 1}, cache)


class FakeWorkers:
    """experiment.run_one without processes; Ctrl-C at the ``interrupt_at``-th call."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls, self.interrupt_at = [], interrupt_at

    def __call__(self, scenario, backend, batch, checkpoint=None, **kwargs):
        self.calls.append((backend, batch))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        return _fake(backend, batch)


@pytest.fixture
def baseline_dir(tmp_path, monkeypatch):
    """A copy of cpu-tiny's baseline file in tmp_path: what an interrupt must not touch."""
    path = tmp_path / "baselines" / "cpu-tiny.json"
    monkeypatch.setattr(baseline_file, "BASELINE_DIR", path.parent)
    path.parent.mkdir()
    path.write_bytes((ROOT / "baselines" / "cpu-tiny.json").read_bytes())
    return path


def test_interrupt_keeps_finished_rows_and_resume_measures_only_the_rest(tmp_path, monkeypatch, baseline_dir, capsys):
    out = tmp_path / "out"
    before = baseline_dir.read_bytes()
    first = FakeWorkers(interrupt_at=4)
    monkeypatch.setattr(experiment, "run_one", first)
    code = commands.call("experiment", ["--scenario", "cpu-tiny", "--output-dir", str(out), "--update-baselines",
                                        "--lanes", "1"])
    said = capsys.readouterr().out
    assert code == 128 + signal.SIGINT
    assert baseline_dir.read_bytes() == before  # never a baseline from a partial run
    rows = json.loads((out / "rows.json").read_text())["rows"]
    assert [(r["measurement"]["backend"], r["measurement"]["batch"]) for r in rows] == first.calls[:3]
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and partial["not_measured"] == ["none/b200", "quanto4/b200", "hqq4/b200"]
    assert f"--output-dir {out} --resume" in said

    second = FakeWorkers()
    monkeypatch.setattr(experiment, "run_one", second)
    code = commands.call("experiment", ["--scenario", "cpu-tiny", "--output-dir", str(out), "--resume",
                                        "--lanes", "1"])
    said = capsys.readouterr().out
    assert second.calls == [("none", 200), ("quanto4", 200), ("hqq4", 200)]  # only what was missing
    assert "resuming: 3 of 6 rows already measured" in said
    final = json.loads((out / "results.json").read_text())
    assert final["complete"] is True and len(final["measurements"]) == 6
    assert [(m["backend"], m["batch"]) for m in final["measurements"]] == experiment.planned_rows(TINY)
    assert code == 1  # fake numbers are outside cpu-tiny's bands: compared, not skipped


class SlowFakeWorkers(FakeWorkers):
    """Each row takes 0.3 s, beating as run_one does (a stopping run raises there); counts how
    many run at once. The ``interrupt_at``-th call is interrupted at once."""

    def __init__(self, interrupt_at=None):
        super().__init__(interrupt_at)
        self.active = self.most = 0
        self.lock = threading.Lock()
        self.started = []

    def __call__(self, scenario, backend, batch, checkpoint=None, beat=None, **kwargs):
        with self.lock:
            self.started.append((backend, batch))
            if len(self.calls) + 1 == self.interrupt_at:
                self.calls.append((backend, batch))
                raise KeyboardInterrupt
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            for _ in range(6):
                time.sleep(0.05)
                beat()
            return super().__call__(scenario, backend, batch, checkpoint, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


def test_lanes_run_rows_at_once_dearest_first_and_an_interrupt_keeps_what_finished(tmp_path, monkeypatch,
                                                                                   baseline_dir, capsys):
    out = tmp_path / "out"
    workers = SlowFakeWorkers()
    monkeypatch.setattr(experiment, "run_one", workers)
    commands.call("experiment", ["--scenario", "cpu-tiny", "--output-dir", str(out), "--lanes", "2"])
    assert workers.most == 2 and sorted(workers.calls[:2]) == [("hqq4", 200), ("quanto4", 200)]
    final = json.loads((out / "results.json").read_text())
    assert [(m["backend"], m["batch"]) for m in final["measurements"]] == experiment.planned_rows(TINY)

    workers = SlowFakeWorkers(interrupt_at=3)
    monkeypatch.setattr(experiment, "run_one", workers)
    code = commands.call("experiment", ["--scenario", "cpu-tiny", "--output-dir", str(out), "--lanes", "2"])
    said = capsys.readouterr().out
    kept = [(r["measurement"]["backend"], r["measurement"]["batch"])
            for r in json.loads((out / "rows.json").read_text())["rows"]]
    assert code == 128 + signal.SIGINT and "--resume" in said
    assert sorted(kept) == sorted(workers.calls[:2])  # the row running beside the interrupt stopped
    assert len(workers.started) < 6  # the last queued row never started (one may race the stop)


def test_resume_retries_failed_rows_and_refuses_rows_of_another_setup(tmp_path):
    store = RowStore(tmp_path, {"scenario": "a"})
    store.add(_fake("none", 1), 1.0)
    store.add(RowFailure("cpu-tiny", "none", 200, "oom", "OOM at batch 200"), 2.0)
    resumed = RowStore(tmp_path, {"scenario": "a"})
    assert [(m.backend, m.batch) for m in resumed.resume()] == [("none", 1)]
    assert resumed.walls() == {("none", 1): 1.0}
    with pytest.raises(ResumeError, match="rows from another setup \\(scenario differ"):
        RowStore(tmp_path, {"scenario": "b"}).resume()


def test_rows_measured_under_another_allocator_setting_are_not_resumed(monkeypatch):
    """A CUDA peak depends on PYTORCH_CUDA_ALLOC_CONF: rows of one table share it (and the device's name)."""
    from kvcache_repro.runner.experiment_command import fingerprint

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    before = fingerprint(TINY, None)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert fingerprint(TINY, None) != before and before["device"] == "cpu"


def test_rows_are_written_atomically(tmp_path, monkeypatch):
    store = RowStore(tmp_path, {"scenario": "a"})
    store.add(_fake("none", 1), 1.0)
    good = store.path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.add(_fake("quanto4", 1), 1.0)
    assert store.path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


@pytest.mark.parametrize("sig, lanes", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 2)],
                         ids=["SIGINT", "SIGTERM", "SIGTERM-2-lanes"])
def test_a_signal_stops_the_worker_and_says_how_to_resume(tmp_path, sig, lanes):
    """The real command with workers that hang: the signal ends it and every worker at once."""
    out = tmp_path / "out"
    env = {**os.environ, faults.ENV: "hang", "PYTHONUNBUFFERED": "1"}
    # As from a terminal: a background job (CI, `cmd &`) starts with SIGINT ignored, and a
    # child inheriting that gets no KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "kvcache_repro", "experiment", "--scenario", "cpu-tiny",
                             "--output-dir", str(out), "--lanes", str(lanes)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while len(hung := [p for p in (out / "logs").glob("*.log") if "not answering" in p.read_text()]) < lanes:
        assert time.monotonic() < deadline and proc.poll() is None, "the workers never started"
        time.sleep(0.2)
    workers = [int(p.read_text().split("worker ")[-1].split(":")[0]) for p in hung]
    proc.send_signal(sig)
    try:
        # stopping takes ~5 s (the worker's SIGTERM grace): 60 s tells a hang from a loaded machine
        said, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the experiment did not stop on the signal within 60 s")
    assert proc.returncode == 128 + sig
    assert f"interrupted ({signal.Signals(sig).name}): 0 of 6 rows measured" in said
    assert "--resume" in said and "baselines untouched" in said
    time.sleep(0.5)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "a worker outlived the interrupted experiment"


# ---- options

@pytest.mark.parametrize("argv, fragment", [
    (["--scenario", "cpu-tiny", "--checkpoint", "/nonexistent"], "--checkpoint applies to scenarios that load"),
    (["--scenario", "seed-arch", "--in-process"], "--in-process is for CPU scenarios"),
    (["--scenario", "cpu-tiny", "--reset-tolerances"], "--reset-tolerances applies only with --update-baselines"),
    (["--scenario", "cpu-tiny", "--worker-timeout", "0"], "--worker-timeout: give a positive"),
    (["--scenario", "gpu-tiny", "--lanes", "2"], "--lanes 2: gpu-tiny runs on cuda, where rows side by side"),
    (["--scenario", "cpu-tiny", "--lanes", "2", "--in-process"], "--in-process measures one row after another"),
])
def test_options_that_do_not_apply_are_an_error(argv, fragment, monkeypatch, capsys):
    def ran(*args, **kwargs):
        raise AssertionError("the experiment ran with an option it ignores")

    monkeypatch.setattr(experiment, "run_experiment", ran)
    with pytest.raises(SystemExit) as exited:
        commands.call("experiment", argv)
    assert exited.value.code == 2 and fragment in capsys.readouterr().err


def test_missing_baseline_file_names_the_recording_command(tmp_path):
    stored = baseline_file.load(tmp_path / "new-scenario.json")
    verdict = comparison.compare(stored, "quanto4", 200, "cache_bytes", 0.3)
    assert not verdict.passed
    assert f"the baseline file {tmp_path / 'new-scenario.json'} does not exist" in verdict.message
    assert baseline_file.RECORD_COMMAND in verdict.message


def test_record_missing_writes_only_entries_with_no_stored_value(baseline_dir):
    data = json.loads(baseline_dir.read_text())
    removed = "hqq4/b200/cache_bytes"
    del data["entries"][removed]  # a renamed protocol, a new metric: no stored value
    baseline_dir.write_text(json.dumps(data))
    ms = [_fake(b, n) for b, n in experiment.planned_rows(TINY)]  # ratios unlike the stored ones
    found = experiment.ratios(ms, TINY.baseline_metrics)
    before = baseline_file.load(baseline_dir).entries
    lines = experiment.update_baselines(TINY, ms, found, run_failed=False, only_missing=True)
    after = baseline_file.load(baseline_dir).entries
    assert {k: after[k] for k in before} == before  # stored entries untouched
    assert set(after) - set(before) == {removed} and lines == [f"{removed}: new -> 0.250"]


def test_recording_the_missing_entries_still_fails_on_a_stored_entry_s_regression(tmp_path, monkeypatch,
                                                                                 baseline_dir, capsys):
    """--record-missing-baselines leaves stored entries as they are, so their verdicts stand (exit 1);
    --update-baselines rewrites them (exit 0)."""
    monkeypatch.setattr(experiment, "run_one", FakeWorkers())  # ratios unlike the stored ones
    before = baseline_dir.read_bytes()
    argv = ["--scenario", "cpu-tiny", "--output-dir", str(tmp_path / "out"), "--lanes", "1"]
    assert commands.call("experiment", [*argv, "--record-missing-baselines"]) == 1
    assert "nothing missing, nothing written" in capsys.readouterr().out and baseline_dir.read_bytes() == before
    assert commands.call("experiment", [*argv, "--update-baselines"]) == 0 and baseline_dir.read_bytes() != before


def test_a_compared_metric_a_measured_row_did_not_report_is_an_unmeasured_verdict(baseline_dir):
    """cpu-tiny compares decode_step_peak; a row that reports none (every decode step re-quantized)
    is a failed verdict naming why, not a metric left out without a word."""
    ms = [_fake(b, n) for b, n in experiment.planned_rows(TINY)]  # no decode_step_peak in their metrics
    found = experiment.ratios(ms, TINY.baseline_metrics, max(TINY.batch_sizes))
    missing = [v for v in experiment._verdicts(TINY, ms, found, []) if v.key.endswith("/decode_step_peak")]
    assert len(missing) == 4 and {v.status for v in missing} == {"unmeasured"} and not any(v.passed for v in missing)
    assert "no decode step without a re-quantization" in missing[0].message


def test_a_large_batch_metric_is_not_compared_at_a_smaller_batch_when_the_large_one_failed():
    """peak_rss_growth is compared at the scenario's largest batch only: with none/b200 failed it is
    not ratioed at b1 instead (allocator noise there)."""
    ms = [_fake(b, n) for b, n in experiment.planned_rows(TINY) if (b, n) != ("none", 200)]
    for m in ms:
        m.metrics["peak_rss_growth"] = 1000 * m.batch
    found = experiment.ratios(ms, ("peak_rss_growth",), max(TINY.batch_sizes))
    assert found == []


@pytest.mark.parametrize("error, is_oom", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"), True),
    (MemoryError(), True), (RuntimeError("shape mismatch"), False), (ValueError("can't allocate memory"), False)])
def test_the_cpu_allocator_s_errors_are_out_of_memory(error, is_oom):
    assert worker_module.out_of_memory(error) is is_oom
    assert worker_module.out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))


def test_a_cpu_oom_in_process_is_an_oom_row_and_the_rest_completes(monkeypatch):
    """On the CPU the allocator raises a RuntimeError, not torch's OutOfMemoryError: still an OOM row."""
    measure = experiment.measure_in_process

    def short_of_memory(scenario, backend, batch, loaded):
        if batch == 200 and backend == "hqq4":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GiB (made up)")
        return measure(scenario, backend, batch, loaded)
    monkeypatch.setattr(experiment, "measure_in_process", short_of_memory)
    monkeypatch.setattr(experiment, "planned_rows", lambda s: [("none", 200), ("hqq4", 200), ("quanto4", 1)])
    measurements, failures = experiment.measure_rows(TINY, None, lambda line: None, in_process=True)
    assert [(f.backend, f.batch, f.kind) for f in failures] == [("hqq4", 200, "oom")]
    assert "can't allocate memory" in failures[0].message and len(measurements) == 2


def test_a_worker_killed_from_outside_is_an_oom_row(tmp_path, monkeypatch):
    """SIGKILL that this run did not send: the kernel's OOM killer, most likely; said so."""
    failure = _shell_worker(tmp_path, monkeypatch, "echo loading\nkill -9 $$", timeout=30)
    assert failure.kind == "oom" and "OOM killer" in failure.message and "loading" in failure.output_tail


# ---- progress

def test_progress_estimates_the_time_left_per_batch():
    now = [0.0]
    lines = []
    p = Progress(experiment.planned_rows(TINY), log=lines.append, clock=lambda: now[0], every=30)
    p.begin("none", 1, limit=200)
    assert "time left unknown" in lines[-1] and "time limit 3m20s" in lines[-1]
    for backend in ("none", "quanto4", "hqq4"):
        if backend != "none":
            p.begin(backend, 1)
        now[0] += 2
        p.end(backend, 1, "ok")
    assert lines[-1].startswith("[3/6 done, 6s elapsed]") and "~6s left (rough" in lines[-1]
    p.begin("none", 200)
    now[0] += 20
    p.beat()
    now[0] += 15
    p.beat()
    assert "running for 35s" in lines[-1]
    p.end("none", 200, "ok")
    assert lines[-1].endswith("~1m10s left")  # two more b200 rows at 35 s, not at b1's 2 s
