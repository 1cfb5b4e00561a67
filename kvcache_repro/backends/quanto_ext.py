"""optimum-quanto's C++ extension: built once during setup, then loaded without a lock;
a lock left behind by a dead process is reported before any run instead of hanging it.

``torch.utils.cpp_extension.load`` takes ``<build dir>/lock`` on every load; torch <= 2.13's is
an O_EXCL file whoever finds it waits on forever, so a process killed holding it hangs every later
quanto run. ``setup`` builds once through quanto; ``prepare`` imports the finished build, never
taking the lock. A stale lock is reported, not removed (why: docs/interruption.md). torch 2.14's
advisory ``FileLock`` leaves a file that blocks nobody: ``lock_mechanism`` detects which. Stdlib
only at import.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

from kvcache_repro.core import cli

EXTENSION_KINDS = ("cpp", "cuda", "hip", "mps")  # extensions/<kind>/build/lock
BATON, ADVISORY = "baton", "advisory"
DIR_ENV = "KVQ_QUANTO_EXTENSIONS_DIR"  # the locks of a copy (tests)


class StaleLockError(RuntimeError):
    """A JIT-build lock no live process holds: every quanto run would wait on it forever."""

    def __init__(self, path: Path, checked: str):
        super().__init__(
            f"stale build lock {path}: left by a process that died while loading or building "
            f"optimum-quanto's extension ({checked}). Every run that touches quanto would wait on it "
            f"forever. Clear it with:\n    rm -f {path}\nthen rerun (`./kvq setup` rebuilds the extension "
            f"if the build was cut short).")


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


def _leftover_blocks(lock_class) -> bool:
    """Does a leftover lock file (nobody holds it) stop ``lock_class``? Tried on a scratch file."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "lock")
        open(path, "w").close()
        if hasattr(lock_class, "try_acquire"):  # FileBaton's API
            baton = lock_class(path)
            if acquired := baton.try_acquire():
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


@functools.lru_cache(maxsize=None)
def lock_mechanism(cpp_extension=None) -> str:
    """BATON when a leftover lock file blocks the build (torch <= 2.13), ADVISORY when not (2.14),
    by trying the lock class ``_jit_compile`` references; none found: BATON (the cautious one)."""
    if cpp_extension is None:  # the installed torch's
        import torch.utils.cpp_extension as cpp_extension
    code = getattr(getattr(cpp_extension, "_jit_compile", None), "__code__", None)
    names = set(code.co_names) if code is not None else set()
    lock_class = next((getattr(cpp_extension, n) for n in ("FileLock", "FileBaton")
                       if n in names and hasattr(cpp_extension, n)), None)
    return BATON if lock_class is None or _leftover_blocks(lock_class) else ADVISORY


def check_lock(path: Path, mechanism: str | None = None) -> list[int]:
    """The pids holding ``path`` open; StaleLockError if it blocks every build and none does. An
    advisory lock's file is harmless: [] when the lock can be taken at once."""
    if not path.exists():
        return []
    if (mechanism or lock_mechanism()) == ADVISORY:
        import fcntl

        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # held (a build): by whom, read below once ours is closed
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)
                return []
        return holders(path)[0] or [0]  # [0]: by a process whose fds we cannot read
    pids, unreadable = holders(path)
    if pids:
        return pids
    checked = "no running process has it open"
    if unreadable:
        checked += f"; {unreadable} processes of other users could not be checked"
    raise StaleLockError(path, checked)


def check_locks(extensions_dir: Path | None = None, mechanism: str | None = None) -> dict[Path, list[int]]:
    """Every quanto extension's lock: raise on the first stale one; live holders by path."""
    extensions_dir = extensions_dir or quanto_extensions_dir()
    paths = [] if extensions_dir is None else [extensions_dir / k / "build" / "lock" for k in EXTENSION_KINDS]
    return {p: pids for p in paths if (pids := check_lock(p, mechanism))}


def load_finished(ext) -> bool:
    """Import a finished build into ``ext._lib`` (no lock taken); False if none. quanto writes
    pytorch_version.txt after ``load`` succeeded; sources newer than the .so: reinstalled."""
    if getattr(ext, "_lib", None) is not None:
        return True
    if not all(hasattr(ext, a) for a in ("build_directory", "name", "sources", "_lib")):
        return False  # another quanto's Extension: its own path builds and loads
    import torch

    build = Path(ext.build_directory)
    so, version = build / f"{ext.name}.so", build / "pytorch_version.txt"
    if (not so.exists() or not version.exists() or version.read_text().strip() != torch.__version__
            or any(Path(s).stat().st_mtime > so.stat().st_mtime for s in ext.sources)):
        return False
    # What torch's cpp_extension does after building, minus the baton around it.
    spec = importlib.util.spec_from_file_location(ext.name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ext._lib = module
    return True


def cpu_extension():
    """quanto's CPU extension, or None where it has no ``get_extension`` (0.2.5 and older)."""
    try:
        from optimum.quanto.library.extensions import get_extension

        return get_extension("quanto_cpp")
    except (ImportError, KeyError):
        return None


def _extension(ext):
    """(``ext`` or the installed CPU extension, None) or (None, why there is nothing to load)."""
    if ext is None and quanto_extensions_dir() is None:
        return None, "optimum-quanto not installed"
    if ext is None and (ext := cpu_extension()) is None:
        return None, "this optimum-quanto has no get_extension('quanto_cpp'): it loads its kernels itself"
    return ext, None


def prepare(ext=None, extensions_dir: Path | None = None) -> str:
    """Before a run that may touch quanto: StaleLockError, or load a finished build (a log line)."""
    check_locks(extensions_dir)
    ext, nothing = _extension(ext)
    if nothing:
        return nothing
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
    ext, nothing = _extension(ext)
    if nothing or load_finished(ext):
        return 0
    log(f"kvq: building optimum-quanto's {ext.name} once ({ext.build_directory}; ~30-50 s)")
    try:
        ext.lib  # quanto's own path: builds under the lock, then writes pytorch_version.txt
    except Exception as error:  # no compiler here: runs will try (and report) again
        log(f"kvq: building {ext.name} failed ({type(error).__name__}: {error}); quanto runs will retry it")
    return 0


def main(argv=None) -> int:
    parser = cli.parser("python -m kvcache_repro.backends.quanto_ext", __doc__, [
        "python -m kvcache_repro.backends.quanto_ext setup   # what ./kvq setup runs",
        "python -m kvcache_repro.backends.quanto_ext check   # only the lock check (never compiles)"],
        "0 ok (a failed build is reported and left to quanto's first use); 3 a stale build lock: the "
        "message names the file and the command that clears it; 2 bad arguments")
    parser.add_argument("action", choices=("setup", "check"),
                        help="setup: check locks and build once; check: only the lock check")
    if parser.parse_args(argv).action == "setup":
        return setup(log=lambda line: print(line, file=sys.stderr))
    try:
        for path, pids in check_locks().items():
            print(f"{path}: held by running process(es) {', '.join(map(str, pids))}")
    except StaleLockError as error:
        print(f"kvq: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
