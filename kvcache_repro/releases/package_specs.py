"""What ``./kvq compat`` checks: a *spec* is one or more packages swapped for the pins of
requirements.txt, each a release or a local build.

    5.17.0                                   transformers 5.17.0 (a bare version: transformers)
    torch==2.14.1                            another torch, everything else pinned
    optimum-quanto==0.2.6   hqq==0.2.7       another quantizer release
    transformers==5.17.0,torch==2.11.0       a combination (the GPU box's stack)
    transformers==5.25.0rc1                  a pre-release from the index
    transformers @ file:///src/transformers  an unreleased build: a source tree ...
    /tmp/wheels/transformers-5.25.0.dev0-py3-none-any.whl   ... or a wheel (name from the file)

Only PACKAGES can be swapped, each at most once. The label names the run's file and its
environment: ``torch-2.14.1``, ``transformers-5.17.0+torch-2.11.0``, ``V`` for transformers==V
alone (as before specs), ``transformers-local-1a2b3c4d`` (a digest of the build's contents).
"""
from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from kvcache_repro.core import provenance

PACKAGES = provenance.PACKAGES  # the matrix's column order, too
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(==|@)\s*(\S.*)$")


class SpecError(ValueError):
    """A spec the suite cannot run: says which part and the forms it accepts."""

    def __init__(self, text: str, problem: str):
        super().__init__(f"compat spec {text!r}: {problem}. Forms: 5.17.0 (transformers), torch==2.14.1, "
                         f"optimum-quanto==0.2.6, hqq==0.2.7, transformers==5.17.0,torch==2.11.0, "
                         f"'transformers @ file:///path/to/checkout', /path/to/transformers-X.whl "
                         f"(packages: {', '.join(PACKAGES)})")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Item:
    package: str  # one of PACKAGES
    version: str = ""  # a release ("" for a local build)
    path: str = ""  # a local wheel or source tree (absolute)
    digest: str = ""  # of the local build's contents

    @property
    def requirement(self) -> str:
        """What pip installs."""
        return f"{self.package}=={self.version}" if self.version else f"{self.package} @ file://{self.path}"

    @property
    def label(self) -> str:
        return f"{self.package}-{self.version}" if self.version else f"{self.package}-local-{self.digest}"


@dataclass(frozen=True)
class Spec:
    items: tuple[Item, ...]  # in PACKAGES order
    text: str = ""  # as given

    @property
    def label(self) -> str:
        if len(self.items) == 1 and self.items[0].package == "transformers" and self.items[0].version:
            return self.items[0].version  # the form runs were stored under before specs existed
        return "+".join(item.label for item in self.items)

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(item.package for item in self.items)

    def item(self, package: str) -> Item | None:
        return next((i for i in self.items if i.package == package), None)

    def to_json(self) -> dict:
        return {"text": self.text, "label": self.label, "items": [asdict(i) for i in self.items]}


def _digest(path: Path) -> str:
    """Of a wheel's bytes, or of a source tree's file names, sizes and mtimes (cheap on a
    transformers checkout: no file is read)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    else:
        for f in sorted(p for p in path.rglob("*") if p.is_file() and ".git" not in p.parts):
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:8]


def _tree_name(path: Path) -> str | None:
    """A source tree's distribution name, from pyproject.toml or setup.py."""
    for name, pattern in (("pyproject.toml", r'(?m)^\s*name\s*=\s*["\']([^"\']+)'),
                          ("setup.py", r'name\s*=\s*["\']([^"\']+)')):
        found = (path / name).exists() and re.search(pattern, (path / name).read_text(errors="replace"))
        if found:
            return found.group(1)
    return None


def _local(text: str, package: str | None, location: str) -> Item:
    path = Path(location.removeprefix("file://")).expanduser().resolve()
    if not path.exists():
        raise SpecError(text, f"{path} does not exist")
    if path.is_file() and path.suffix != ".whl":
        raise SpecError(text, f"{path} is neither a wheel (.whl) nor a source tree")
    found = (normalize(path.name.split("-")[0]) if path.is_file() else
             normalize(_tree_name(path) or "") or None)
    if package is None:
        if found is None:
            raise SpecError(text, f"cannot tell which package {path} builds: write 'NAME @ file://{path}'")
        package = found
    elif found and found != package:
        raise SpecError(text, f"{path} builds {found}, not {package}")
    if package not in PACKAGES:
        raise SpecError(text, f"{package} is not one of the packages the result depends on")
    return Item(package, path=str(path), digest=_digest(path))


def parse_item(text: str, part: str) -> Item:
    if not (part := part.strip()):
        raise SpecError(text, "an empty part")
    with contextlib.suppress(InvalidVersion):
        return Item("transformers", str(Version(part)))  # a bare version: a transformers release
    if (match := _NAME.match(part)) is None:
        if "/" in part or part.endswith(".whl"):
            return _local(text, None, part)
        raise SpecError(text, f"cannot read {part!r}")
    name, op, rest = normalize(match.group(1)), match.group(2), match.group(3).strip()
    if name not in PACKAGES:
        raise SpecError(text, f"unknown package {match.group(1)!r}")
    if op == "@":
        return _local(text, name, rest)
    try:
        return Item(name, str(Version(rest)))
    except InvalidVersion:
        raise SpecError(text, f"{rest!r} is not a version of {name}") from None


def parse(text: str) -> Spec:
    """A spec from the command line: parts separated by commas."""
    items = [parse_item(text, part) for part in text.split(",")]
    seen = [i.package for i in items]
    if duplicate := next((p for p in seen if seen.count(p) > 1), None):
        raise SpecError(text, f"{duplicate} is named twice")
    return Spec(tuple(sorted(items, key=lambda i: PACKAGES.index(i.package))), text)


def pinned(root: Path) -> dict[str, str]:
    """The pins of requirements.txt for PACKAGES."""
    out = {}
    for line in (root / "requirements.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and normalize(name.strip()) in PACKAGES:
            out[normalize(name.strip())] = version.split("#")[0].strip()
    return out


def requirements_for(version: str, pinned: list[str]) -> list[str]:
    """The pinned requirement lines with transformers swapped for ``version``, and
    optimum-quanto moved where that transformers needs it (docs/facts.md: < 4.47 needs 0.2.4;
    0.2.7 fails there with "shift must be specified for qtypes lower than 8-bit")."""
    out = []
    for line in pinned:
        name = line.split("==")[0].strip().lower()
        if name == "transformers":
            line = f"transformers=={version}"
        elif name == "optimum-quanto" and Version(version) < Version("4.47"):
            line = "optimum-quanto==0.2.4"
        out.append(line)
    return out


class IndexUnreachable(RuntimeError):
    """The package index could not say which release is newest (no network, pip failed)."""


def newest(package: str, pre: bool = False) -> str:
    """The newest release of ``package`` on the index pip is configured for (``pip index
    versions``; with ``pre``, pre-releases count)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pip", "index", "versions", package, "--disable-pip-version-check"]
    way_out = "Give the specs by hand (./kvq compat torch==X ...) or run where the index is reachable"
    try:
        proc = subprocess.run(cmd + (["--pre"] if pre else []), capture_output=True, text=True, timeout=120)
    except (subprocess.TimeoutExpired, OSError) as error:
        raise IndexUnreachable(f"cannot ask the package index for the newest {package}: {error}. {way_out}") from None
    first = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    found = re.match(rf"^{re.escape(package)}\s+\((\S+)\)", first, re.I)
    if proc.returncode or not found:
        why = (proc.stderr.strip().splitlines() or [first or "no output"])[-1]
        raise IndexUnreachable(f"cannot ask the package index for the newest {package} ({' '.join(cmd[2:])}): "
                               f"{why}. {way_out}")
    return found.group(1)


def newer(found: str, pin: str) -> bool:
    """The index's release is newer than the pin (local build tags dropped: 2.13.0+cpu is 2.13.0);
    an index behind the pin, or the pin spelt otherwise (5.25 for 5.25.0), is not."""
    return Version(found.split("+")[0]) > Version(pin.split("+")[0])


@dataclass(frozen=True)
class LatestRow:
    spec: Spec
    stands_for: tuple[str, ...]  # the packages whose newest release it checks ("all together" too)


def latest(pins: dict[str, str], found: dict[str, str]) -> list[LatestRow]:
    """The rows of ``--latest``: each package's newest release alone against the pins, and
    all of them together. A newest release that is the pin is checked by the row of the pins
    (the pinned transformers); "all together" is that row, or the one package's own row (the
    same label), when fewer than two packages moved."""
    moved = [p for p in PACKAGES if newer(found[p], pins[p])]
    pins_row = parse(pins["transformers"])
    rows: dict[str, tuple[Spec, list[str]]] = {}

    def add(spec: Spec, what: str) -> None:
        rows.setdefault(spec.label, (spec, []))[1].append(what)

    for package in PACKAGES:
        add(parse(f"{package}=={found[package]}") if package in moved else pins_row, package)
    add(parse(",".join(f"{p}=={found[p]}" for p in moved)) if moved else pins_row, "all together")
    return [LatestRow(spec, tuple(what)) for spec, what in rows.values()]
