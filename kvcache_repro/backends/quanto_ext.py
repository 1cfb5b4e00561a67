"""optimum-quanto's C++ extension: built once during setup, then loaded without a lock;
a lock left behind by a dead process is reported before any run instead of hanging it.

Why: quanto JIT-builds ``quanto_cpp`` through ``torch.utils.cpp_extension.load``, which
takes ``<build dir>/lock`` on *every* load, not only when it compiles (a ``FileBaton``:
an empty file created with O_EXCL; anyone who finds it sleeps until it disappears, with
no timeout). A process killed while holding it (Ctrl-C, ``timeout``, the OOM killer, a
worker's time limit) leaves the file behind, and every later run that touches quanto
waits forever with no output.

What this module does:

- ``./kvq setup`` runs ``python -m kvcache_repro.backends.quanto_ext setup``: check the locks,
  then build (or load) the extension once through quanto itself, so its
  ``pytorch_version.txt`` marks the build finished.
- Tests and workers call ``prepare()``: check the locks, then import the finished build
  directly (``ext._lib``, which quanto's ``Extension.lib`` returns as is), so they never
  take the lock and cannot leave one behind. With no finished build, quanto's own path
  builds it as before.

Stale lock policy: **reported, not removed.** The baton records no owner; the only sign
of a live holder is an open file descriptor, seen through ``/proc/*/fd``. That misses
processes in another PID namespace sharing the same venv (a container, a second
machine on a shared filesystem) and other users' processes, whose fds we cannot read.
Removing the lock under a live build lets two compilers write the same ``.so``; reporting
costs the user one command. So a lock no visible process holds is an error naming the
path, what was checked, and ``rm -f PATH``; a lock a live process holds is left alone
(that process is building: waiting for it is right, and the worker's time limit bounds
the wait).

Which lock the installed torch uses is detected, not assumed (``lock_mechanism``): torch
<= 2.13 locks with that ``FileBaton``; torch 2.14 replaced it with an OS-level advisory
``FileLock`` on the same path (pytorch issue 189245), whose file stays after every release
and blocks nobody, while a live holder is seen by trying the lock without blocking. A
leftover file is stale only under the baton.

Stdlib only at import: the check runs before torch is imported (torch is imported only
when a lock file exists, to ask it which mechanism it uses).
"""
from __future__ import annotations

from kvcache_repro.core import cli

import argparse
import importlib.util
import os
import sys
from pathlib import Path

EXTENSION_KINDS = ("cpp", "cuda", "hip", "mps")  # optimum/quanto/library/extensions/<kind>/build/lock


class StaleLockError(RuntimeError):
    """A JIT-build lock no live process holds: every quanto run would wait on it forever."""

    def __init__(self, path: Path, checked: str):
        self.path = path
        super().__init__(
            f"stale build lock {path}: left by a process that died while loading or building "
            f"optimum-quanto's extension ({checked}). Every run that touches quanto would wait on it "
            f"forever. Clear it with:\n    rm -f {path}\nthen rerun (`./kvq setup` rebuilds the extension "
            f"if the build was cut short).")


# Where the locks are looked for, instead of the installed quanto's: to reproduce a stale
# lock on a copy (tests, demonstrations) without touching the real venv.
DIR_ENV = "KVQ_QUANTO_EXTENSIONS_DIR"


def quanto_extensions_dir() -> Path | None:
    """optimum/quanto/library/extensions without importing optimum.quanto (or torch)."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    try:
        spec = importlib.util.find_spec("optimum.quanto")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "library" / "extensions"


def lock_paths(extensions_dir: Path | None = None) -> list[Path]:
    extensions_dir = extensions_dir or quanto_extensions_dir()
    if extensions_dir is None:
        return []
    return [extensions_dir / kind / "build" / "lock" for kind in EXTENSION_KINDS]


def holders(path: Path, proc: Path = Path("/proc")) -> tuple[list[int], int]:
    """(pids with ``path`` open, number of processes whose fds could not be read)."""
    target = os.path.realpath(path)
    found, unreadable = [], 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            unreadable += 1
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    found.append(int(entry.name))
                    break
            except OSError:
                continue
    return found, unreadable


BATON, ADVISORY = "baton", "advisory"


def _jit_lock_class(cpp_extension):
    """The lock class torch's JIT build path references (``_jit_compile``'s global names):
    what ``load`` really takes, whatever else the module imports."""
    code = getattr(getattr(cpp_extension, "_jit_compile", None), "__code__", None)
    names = set(code.co_names) if code is not None else set()
    for name in ("FileLock", "FileBaton"):
        if name in names and hasattr(cpp_extension, name):
            return getattr(cpp_extension, name)
    return None


def _leftover_blocks(lock_class) -> bool:
    """Does a lock file that a killed process left (exists, nobody holds it) stop
    ``lock_class`` from acquiring? Tried on a scratch file, never the real lock."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "lock")
        open(path, "w").close()
        if hasattr(lock_class, "try_acquire"):  # FileBaton's API
            baton = lock_class(path)
            acquired = baton.try_acquire()
            if acquired:
                baton.release()
            return not acquired
        lock = lock_class(path, timeout=0)
        try:
            lock.acquire()
        except Exception as error:  # filelock.Timeout (named so that filelock is optional)
            if type(error).__name__ == "Timeout":
                return True
            raise
        lock.release()
        return False


_MECHANISM: dict[str, str] = {}


def lock_mechanism(cpp_extension=None) -> str:
    """BATON when a leftover lock file blocks the installed torch's extension build (torch
    <= 2.13), ADVISORY when it does not (torch 2.14's FileLock). Decided by trying the
    class that ``cpp_extension._jit_compile`` uses on a scratch file; an unknown mechanism
    counts as BATON (the cautious reading: a leftover file is reported, never ignored)."""
    if cpp_extension is None:
        if "installed" in _MECHANISM:
            return _MECHANISM["installed"]
        import torch.utils.cpp_extension as cpp_extension

        _MECHANISM["installed"] = mechanism = lock_mechanism(cpp_extension)
        return mechanism
    lock_class = _jit_lock_class(cpp_extension)
    if lock_class is None:
        return BATON
    return BATON if _leftover_blocks(lock_class) else ADVISORY


def _advisory_holders(path: Path) -> list[int]:
    """Under an advisory lock: the pids holding it (a build in progress), or [] when it
    can be taken at once (then it is released again: the file itself is harmless)."""
    import fcntl

    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
        else:
            held = False
            fcntl.flock(handle, fcntl.LOCK_UN)
    if not held:
        return []
    pids, _ = holders(path)  # after closing ours, so this process is not among them
    return pids or [0]  # held, by a process whose fds we cannot read


def check_lock(path: Path, mechanism: str | None = None) -> list[int]:
    """Raise StaleLockError if ``path`` is a lock that blocks every build and no visible
    process holds it open; return the pids holding it (empty when there is no lock, or
    when the installed torch's lock file is harmless while nobody holds it)."""
    if not path.exists():
        return []
    if (mechanism or lock_mechanism()) == ADVISORY:
        return _advisory_holders(path)
    pids, unreadable = holders(path)
    if pids:
        return pids
    checked = "no running process has it open"
    if unreadable:
        checked += f"; {unreadable} processes of other users could not be checked"
    raise StaleLockError(path, checked)


def check_locks(extensions_dir: Path | None = None, mechanism: str | None = None) -> dict[Path, list[int]]:
    """Every quanto extension's lock: raise on the first stale one; live holders by path."""
    return {p: pids for p in lock_paths(extensions_dir) if (pids := check_lock(p, mechanism))}


def _finished_build(ext) -> Path | None:
    """The extension's .so if a build finished for this torch and its sources: quanto
    writes pytorch_version.txt only after ``load`` succeeded, so a build cut short has
    none; sources newer than the .so mean quanto was reinstalled."""
    import torch

    if not all(hasattr(ext, a) for a in ("build_directory", "name", "sources", "_lib")):
        return None  # another quanto's Extension: its own path builds and loads (detected, not assumed)
    build = Path(ext.build_directory)
    so, version = build / f"{ext.name}.so", build / "pytorch_version.txt"
    if not so.exists() or not version.exists() or version.read_text().strip() != torch.__version__:
        return None
    if any(Path(s).stat().st_mtime > so.stat().st_mtime for s in ext.sources):
        return None
    return so


def load_finished(ext) -> bool:
    """Import a finished build straight into ``ext._lib`` (no lock taken). False if none."""
    if getattr(ext, "_lib", None) is not None:
        return True
    so = _finished_build(ext)
    if so is None:
        return False
    # What torch's cpp_extension does after building, minus the baton around it.
    spec = importlib.util.spec_from_file_location(ext.name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ext._lib = module
    return True


def cpu_extension():
    """quanto's CPU extension object, or None where this quanto has no ``get_extension``
    (0.2.5 and older register their kernels another way): nothing to preload, quanto
    loads its kernels itself (detected, not assumed; measured with ./kvq compat)."""
    try:
        from optimum.quanto.library.extensions import get_extension
    except ImportError:
        return None
    try:
        return get_extension("quanto_cpp")
    except KeyError:
        return None


def prepare(ext=None, extensions_dir: Path | None = None) -> str:
    """Before any run that may touch quanto: stale locks are an error (StaleLockError);
    a finished CPU build is loaded without a lock. Returns what was done, for logs."""
    check_locks(extensions_dir)
    if ext is None:
        if quanto_extensions_dir() is None:
            return "optimum-quanto not installed"
        ext = cpu_extension()
        if ext is None:
            return "this optimum-quanto has no get_extension('quanto_cpp'): it loads its kernels itself"
    if load_finished(ext):
        return f"{ext.name}: loaded the finished build in {ext.build_directory}"
    return f"{ext.name}: no finished build yet; quanto builds it on first use (`./kvq setup` does it once)"


def setup(ext=None, extensions_dir: Path | None = None, log=print) -> int:
    """``./kvq setup``: check the locks, then make sure a finished build exists."""
    try:
        check_locks(extensions_dir)
    except StaleLockError as error:
        log(f"kvq: {error}")
        return 3
    if ext is None:
        if quanto_extensions_dir() is None:
            return 0
        ext = cpu_extension()
        if ext is None:
            return 0
    if load_finished(ext):
        return 0
    log(f"kvq: building optimum-quanto's {ext.name} once ({ext.build_directory}; ~30-50 s)")
    try:
        ext.lib  # quanto's own path: builds under the lock, then writes pytorch_version.txt
    except Exception as error:  # no compiler here: runs will try (and report) again
        log(f"kvq: building {ext.name} failed ({type(error).__name__}: {error}); quanto runs will retry it")
        return 0
    return 0


def main(argv=None) -> int:
    parser = cli.parser("python -m kvcache_repro.backends.quanto_ext", __doc__, [
        "python -m kvcache_repro.backends.quanto_ext setup   # what ./kvq setup runs",
        "python -m kvcache_repro.backends.quanto_ext check   # only the lock check (never compiles)"],
        "0 ok (a failed build is reported and left to quanto's first use); 3 a stale build lock: the "
        "message names the file and the command that clears it; 2 bad arguments")
    parser.add_argument("action", choices=("setup", "check"),
                        help="setup: check locks and build once; check: only the lock check")
    args = parser.parse_args(argv)
    if args.action == "check":
        try:
            for path, pids in check_locks().items():
                print(f"{path}: held by running process(es) {', '.join(map(str, pids))}")
        except StaleLockError as error:
            print(f"kvq: {error}", file=sys.stderr)
            return 3
        return 0
    return setup(log=lambda line: print(line, file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
