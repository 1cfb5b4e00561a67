"""One measurement in a fresh process: ``python -m kvcache_repro.runner.worker SCENARIO BACKEND BATCH``.

A fresh process per row makes peak RSS mean "this run", as the seed ran each backend in a
fresh kernel. The worker prints the Measurement as one ``RESULT `` JSON line on stdout; out
of memory is an outcome, not a crash: a ``FAILED `` line (a RowFailure), exit OOM_EXIT.
Progress goes to stderr line by line: a hung worker's last words. SIGTERM (the parent's
first signal) raises KeyboardInterrupt, so ``finally`` blocks run (torch's release of
quanto's build lock among them). ``run_one`` is the parent's side.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvcache_repro.measure import reserved, scenarios  # torch-free
from kvcache_repro.runner import limits

ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "RESULT "
FAILED_PREFIX = "FAILED "
OOM_EXIT = 3
STALE_LOCK_EXIT = 4
NOTES_SEPARATOR = " | "  # between the notes of one Measurement
GIB = 2**30
TAIL_LINES = 15
KILL_GRACE_S = 5.0  # from SIGTERM (the worker releases what it holds) to SIGKILL


@dataclasses.dataclass(frozen=True)
class RowFailure:
    """A (backend, batch) that produced no measurement, and why: a row of the result."""

    scenario: str
    backend: str
    batch: int
    kind: str  # "oom", "timeout" or "error"
    message: str  # one line, for the table
    output_tail: str = ""  # the worker's last output lines
    free_bytes: int | None = None  # device memory free after the OOM

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RowFailure":
        return cls(**data)


class RunFailed(RuntimeError):
    pass


class RowFailed(RunFailed):
    """A worker produced no measurement; ``failure`` says why (oom / timeout / error)."""

    def __init__(self, failure: RowFailure):
        tail = "\nlast output of the worker:\n" + failure.output_tail if failure.output_tail else ""
        super().__init__(failure.message + tail)
        self.failure = failure


def free_memory(device: str) -> tuple[int | None, int | None]:
    """(free, total) bytes of the device: CUDA from the driver, CPU MemAvailable."""
    try:
        if device == "cuda":
            import torch

            return tuple(int(n) for n in torch.cuda.mem_get_info())
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (RuntimeError, OSError, KeyError, ValueError):
        return None, None


def out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError; on the CPU a MemoryError or the allocator's RuntimeError."""
    import torch

    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def oom(scenario: str, backend: str, batch: int, device: str, error: BaseException) -> RowFailure:
    """The row for an out-of-memory error, with what the device had free once the failed run's
    tensors were released (what a smaller batch could use)."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    free, total = free_memory(device)
    where = "this device" if device == "cpu" else "this device (cuda)"
    room = "free memory unknown" if free is None else f"{free / GIB:.2f} GiB free of {total / GIB:.2f} GiB"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RowFailure(scenario, backend, batch, "oom",
                      f"OOM at batch {batch} on {where}, {room} ({first[:160]})", free_bytes=free)


# ---- the parent's side

def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # looked up here: the child of a fork among threads (lanes.py) imports nothing


def _die_with_parent() -> None:
    """In the worker, before exec: a SIGKILLed experiment must not leave it running."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    """End the worker and everything it started (its own session: ninja, g++): SIGTERM, a grace
    for its ``finally`` blocks, then SIGKILL to whatever of the group is left (a child that
    ignored the TERM outlives a worker that obeyed it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(KILL_GRACE_S if sig == signal.SIGTERM else None)


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(line for line in lines[-TAIL_LINES:] if not line.startswith(RESULT_PREFIX))


def run_one(scenario: str, backend: str, batch: int, checkpoint: str | None = None,
            timeout: float | None = None, env: dict | None = None, log_path: Path | None = None,
            beat=None, beat_every: float = 1.0):
    """One Measurement in a fresh process, killed after ``timeout`` s (default: limits.py);
    RowFailed with its last output for an OOM, a timeout or an error. ``log_path`` keeps its
    output; ``beat()`` runs about every ``beat_every`` s; an interrupt stops the worker."""
    from kvcache_repro.measure.memory import Measurement

    limit = timeout if timeout is not None else limits.worker_seconds(scenarios.get(scenario))
    cmd = [sys.executable, "-m", "kvcache_repro.runner.worker", scenario, backend, str(batch)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    with contextlib.ExitStack() as stack:
        if log_path is None:
            temporary = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvq-worker-"))
            log_path = Path(temporary) / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1",
                                         **reserved.worker_env(scenarios.get(scenario).device), **(env or {})},
                                    start_new_session=True, preexec_fn=_die_with_parent)
            deadline = time.monotonic() + limit
            try:
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        proc.wait(min(left, beat_every))
                        break
                    except subprocess.TimeoutExpired:
                        if beat:
                            beat()
                else:
                    _stop(proc)  # before the tail: its last words after the TERM belong in it
                    raise RowFailed(RowFailure(
                        scenario, backend, batch, "timeout",
                        f"no result after {limit:.0f} s (the time limit; limits.py), worker killed",
                        _tail(log_path)))
            except BaseException:
                _stop(proc)
                raise
        for line in reversed(log_path.read_text(errors="replace").splitlines()):
            if proc.returncode == 0 and line.startswith(RESULT_PREFIX):
                return Measurement.from_dict(json.loads(line[len(RESULT_PREFIX):]))
            if line.startswith(FAILED_PREFIX):
                raise RowFailed(RowFailure.from_dict(json.loads(line[len(FAILED_PREFIX):])))
        tail = _tail(log_path)
        last = tail.splitlines()[-1] if tail else "no output"
        if proc.returncode == -signal.SIGKILL:  # not by this run (its kills raise above): the kernel's OOM killer, likely
            failure = oom(scenario, backend, batch, "cpu", RuntimeError(
                f"the worker was killed by SIGKILL from outside, most likely by the kernel's OOM killer; last: {last}"))
            raise RowFailed(dataclasses.replace(failure, output_tail=tail))
        raise RowFailed(RowFailure(scenario, backend, batch, "error", f"exit {proc.returncode}: {last}",
                                   tail))


# ---- the worker

def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def say(line: str) -> None:
    print(f"worker {os.getpid()}: {line}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("backend")
    parser.add_argument("batch", type=int)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    from kvcache_repro import faults

    scenario = scenarios.get(args.scenario)
    if scenario.model != "checkpoint":
        # only a scenario that names a hub checkpoint may reach the hub
        os.environ["HF_HUB_OFFLINE"] = "1"
    say(f"{scenario.name} {args.backend} b{args.batch}: starting")
    faults.in_worker()  # KVQ_FAULT, as the test process has it
    from kvcache_repro.backends import quanto_ext
    from kvcache_repro.measure import memory, threads

    threads.pin()
    try:
        notes = [memory.BACKENDS[args.backend].kind.prepare(say)]  # quanto: its extension
    except quanto_ext.StaleLockError as error:
        print(str(error), file=sys.stderr, flush=True)
        return STALE_LOCK_EXIT
    say("loading the model")
    model, tokenizer = memory.load_model(scenario, args.checkpoint)
    say(f"generating {scenario.tokens(args.batch)} new tokens")
    try:
        result = memory.measure(scenario, args.backend, args.batch, model, tokenizer)
    except Exception as error:
        if not out_of_memory(error):
            raise
        failure = oom(scenario.name, args.backend, args.batch, scenario.device, error)
        say(failure.message)
        sys.stdout.write(FAILED_PREFIX + json.dumps(failure.to_dict()) + "\n")
        return OOM_EXIT
    notes += getattr(model, "kvq_notes", [])  # random weights (offline.py)
    notes = NOTES_SEPARATOR.join(n for n in [result.notes, *notes] if n)
    result = dataclasses.replace(result, notes=notes)
    say(f"done: generate {result.generate_seconds:.1f} s")
    sys.stdout.write(RESULT_PREFIX + json.dumps(result.to_dict()) + "\n")
    return 0


def _where(error: BaseException) -> str:
    """The line the worker was running when the signal came (not the handler's own)."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.name != "_terminate"]
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stopped:  # one line saying where, not a traceback
        say(f"stopped ({stopped}) at {_where(stopped)}")
        sys.exit(130)
