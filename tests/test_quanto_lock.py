"""quanto's build lock (quanto_ext.py): a lock a dead process left is reported before any run,
with its path and the fix, instead of every quanto run waiting on it forever; a finished build
is loaded without taking the lock. All on copies in tmp_path."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from kvcache_repro.backends import quanto_ext

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["unpack.cpp", "pybind_module.cpp"]


def _copy_extension(tmp_path: Path, with_build: bool) -> Path:
    """tmp_path/extensions/cpp: quanto's sources (and its finished build), mtimes kept."""
    real = quanto_ext.quanto_extensions_dir()
    if real is None:
        pytest.skip("optimum-quanto not installed")
    real, cpp = real / "cpp", tmp_path / "extensions" / "cpp"
    (cpp / "build").mkdir(parents=True)
    for name in ("unpack.h", *SOURCES):
        shutil.copy2(real / name, cpp / name)
    if with_build:
        if not (real / "build" / "pytorch_version.txt").exists():
            pytest.skip("quanto_cpp not built in this venv yet (./kvq setup builds it)")
        for name in ("quanto_cpp.so", "pytorch_version.txt"):
            shutil.copy2(real / "build" / name, cpp / "build" / name)
    return cpp


def _extension(cpp: Path):
    from optimum.quanto.library.extensions.extension import Extension

    return Extension("quanto_cpp", root_dir=str(cpp), sources=SOURCES)


def _lock_as_a_killed_process_leaves_it(lock: Path) -> None:
    """What a `timeout`-killed worker does: create the lock (O_EXCL), then die holding it."""
    code = (f"import os, signal; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); "
            f"os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -signal.SIGKILL and lock.exists()


def _holding(lock: Path, mechanism: str | None = None) -> subprocess.Popen:
    """A live process holding the lock as the installed torch takes it (a build in progress):
    an O_EXCL file (FileBaton), or torch 2.14's flock."""
    if (mechanism or quanto_ext.lock_mechanism()) == quanto_ext.ADVISORY:
        take = f"import fcntl; f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)"
    else:
        take = f"import os; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)"
    code = f"import sys, time; {take}; print('held', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _skip_under_an_advisory_lock(why: str) -> None:
    if quanto_ext.lock_mechanism() == quanto_ext.ADVISORY:
        pytest.skip(f"the installed torch's advisory lock {why}")


def test_stale_lock_stops_a_run_with_the_path_and_the_fix_instead_of_hanging(tmp_path):
    _skip_under_an_advisory_lock("leaves a file that blocks nobody "
                                 "(test_a_leftover_file_is_harmless_under_an_advisory_lock)")
    cpp = _copy_extension(tmp_path, with_build=False)
    lock = cpp / "build" / "lock"
    _lock_as_a_killed_process_leaves_it(lock)
    # What a worker or a test session does first, then quanto's first CPU unpack (ext.lib:
    # torch's cpp_extension.load, which waits on the lock with no timeout).
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from optimum.quanto.library.extensions.extension import Extension
        from kvcache_repro.backends import quanto_ext
        ext = Extension("quanto_cpp", root_dir={str(cpp)!r}, sources={SOURCES!r})
        try:
            quanto_ext.prepare(ext, extensions_dir=Path({str(cpp.parent)!r}))
        except quanto_ext.StaleLockError as error:
            print(error)
            sys.exit(3)
        ext.lib
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                              timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung on the stale lock instead of reporting it")
    assert proc.returncode == 3, proc.stderr
    assert f"stale build lock {lock}" in proc.stdout
    assert f"rm -f {lock}" in proc.stdout
    assert lock.exists()  # reported, not removed (module docstring: why)


@pytest.mark.parametrize("mechanism", [quanto_ext.BATON, quanto_ext.ADVISORY])
def test_a_lock_a_live_process_holds_is_not_stale_and_what_its_death_leaves(tmp_path, mechanism):
    """Under the baton (torch <= 2.13) the file a dead holder leaves blocks every build: stale.
    Under the advisory lock (torch 2.14) the kernel released it: the file is harmless."""
    lock = tmp_path / "lock"
    holder = _holding(lock, mechanism)
    try:
        assert quanto_ext.check_lock(lock, mechanism) == [holder.pid]
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()
    if mechanism == quanto_ext.BATON:
        with pytest.raises(quanto_ext.StaleLockError, match="no running process has it open"):
            quanto_ext.check_lock(lock, mechanism)
    else:
        assert quanto_ext.check_lock(lock, mechanism) == []
    assert quanto_ext.check_lock(tmp_path / "absent", mechanism) == []


def _module_like_torch(version: str, name: str, lock_class, take: str):
    """A cpp_extension whose ``_jit_compile`` takes the lock as torch ``version``'s does."""
    module = types.ModuleType(f"cpp_extension_like_{version}")
    setattr(module, name, lock_class)
    exec(f"import os\ndef _jit_compile(build_directory):\n    {take}\n", module.__dict__)
    return module


def test_the_lock_mechanism_is_detected_from_what_the_build_path_does():
    """By trying the class _jit_compile uses on a scratch leftover file: torch 2.14's FileLock
    (the file persists harmlessly) runs, a 2.13 ``FileBaton`` is still caught."""
    filelock = pytest.importorskip("filelock")
    like_2_14 = _module_like_torch("2_14", "FileLock", filelock.FileLock,
                                   "with FileLock(os.path.join(build_directory, 'lock')):\n        pass")
    assert quanto_ext.lock_mechanism(like_2_14) == quanto_ext.ADVISORY
    try:
        from torch.utils.file_baton import FileBaton
    except ImportError:
        pytest.skip("this torch has no torch.utils.file_baton")
    like_2_13 = _module_like_torch("2_13", "FileBaton", FileBaton,
                                   "baton = FileBaton(os.path.join(build_directory, 'lock'))")
    assert quanto_ext.lock_mechanism(like_2_13) == quanto_ext.BATON
    assert quanto_ext.lock_mechanism(types.ModuleType("no_jit_compile")) == quanto_ext.BATON  # cautious
    assert quanto_ext.lock_mechanism() in (quanto_ext.BATON, quanto_ext.ADVISORY)


def test_a_leftover_file_is_harmless_under_an_advisory_lock(tmp_path):
    """torch 2.14 re-creates build/lock on every load and leaves it: not reported."""
    cpp = _copy_extension(tmp_path, with_build=False)
    _lock_as_a_killed_process_leaves_it(cpp / "build" / "lock")
    assert quanto_ext.check_locks(cpp.parent, quanto_ext.ADVISORY) == {}
    with pytest.raises(quanto_ext.StaleLockError):
        quanto_ext.check_locks(cpp.parent, quanto_ext.BATON)


def test_a_finished_build_is_loaded_without_the_lock(tmp_path):
    """With a build in progress elsewhere holding the lock, a finished build still loads at once."""
    import torch

    cpp = _copy_extension(tmp_path, with_build=True)
    holder = _holding(cpp / "build" / "lock")
    try:
        ext = _extension(cpp)
        assert "loaded the finished build" in quanto_ext.prepare(ext, extensions_dir=cpp.parent)
        assert ext._lib is not None and Path(ext._lib.__spec__.origin) == cpp / "build" / "quanto_cpp.so"
        packed = torch.tensor([[0x21, 0x43]], dtype=torch.uint8)
        assert ext.lib.unpack(packed, 4).tolist() == [[1, 3], [2, 4]]
    finally:
        holder.kill()
        holder.wait()


def test_a_build_cut_short_is_not_loaded(tmp_path):
    """No pytorch_version.txt (quanto writes it after a successful load): not finished."""
    cpp = _copy_extension(tmp_path, with_build=True)
    (cpp / "build" / "pytorch_version.txt").unlink()
    ext = _extension(cpp)
    assert not quanto_ext.load_finished(ext) and ext._lib is None


def test_setup_reports_a_stale_lock_with_exit_3(tmp_path):
    _skip_under_an_advisory_lock("leaves no stale file to report")
    cpp = _copy_extension(tmp_path, with_build=False)
    _lock_as_a_killed_process_leaves_it(cpp / "build" / "lock")
    said = []
    assert quanto_ext.setup(ext=object(), extensions_dir=cpp.parent, log=said.append) == 3
    assert "rm -f" in said[0] and str(cpp / "build" / "lock") in said[0]


def test_an_extension_object_of_another_shape_is_left_to_quanto_s_own_path():
    """An Extension without build_directory/_lib: left to quanto, no finished build claimed."""
    class OtherShape:
        name = "quanto_cpp"

    assert quanto_ext.load_finished(OtherShape()) is False


def test_a_quanto_without_get_extension_is_left_to_load_its_kernels(monkeypatch):
    """optimum-quanto 0.2.5 has no get_extension (once an ImportError in conftest)."""
    import optimum.quanto.library.extensions as extensions

    if hasattr(extensions, "get_extension"):  # on 0.2.5 and older it is already absent
        monkeypatch.delattr(extensions, "get_extension")
    assert quanto_ext.cpu_extension() is None
    assert "loads its kernels itself" in quanto_ext.prepare()
    assert quanto_ext.setup(log=lambda line: None) == 0
