"""Loading a hub checkpoint or a local directory: the GPU ``seed`` scenario (NF4 weights
through bitsandbytes, double quant, fp16 compute, as the seed did) and a user's model
(``./kvq experiment --model``: native weights unless ``--weights nf4``), on the
scenario's device; flash-attention 2 on CUDA when installed (sdpa otherwise). NF4 needs
requirements-gpu.txt; the hub is reached only if HF_HUB_OFFLINE is unset.

``probe`` reads a model's config in a child process (this one must not import
transformers before the hub setting is made, nor initialise CUDA), so that a model that
cannot load stops the experiment once, before any worker, with the reason and the fix.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from kvcache_repro.backends.model_cache import ModelUnavailable

NF4_FIX = "pip install -r requirements-gpu.txt (bitsandbytes), or run with native weights (--weights native)"


def identity(model: str, config: dict | None) -> dict:
    """What names a model's architecture for its baseline file: a hub id as given; a local
    directory by its name and a digest of its config.json (memory depends on the
    architecture and dtype, not on weight values: a copy moved elsewhere keeps its
    baselines, another model saved under the same name does not get them)."""
    path = Path(model).expanduser()
    if path.is_dir():
        raw = (path / "config.json").read_bytes() if (path / "config.json").exists() else b""
        return {"name": path.resolve().name, "local": True, "config_sha256": hashlib.sha256(raw).hexdigest()[:16]}
    return {"name": model.replace("/", "--"), "hub_id": model}


def explain(model: str, error: str) -> str:
    """A load failure's reason and fix, from transformers' / huggingface_hub's message."""
    text = error.lower()
    path_like = model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()
    if path_like and not Path(model).expanduser().is_dir():
        why, fix = ("no such local directory", "check the path: a model directory holds config.json, the weights "
                                               "and a tokenizer (e.g. what `save_pretrained` writes)")
    elif path_like and not (Path(model).expanduser() / "config.json").exists():
        why, fix = ("the directory has no config.json", "point --model at the directory `save_pretrained` wrote")
    elif "repo id must be in the form" in text:
        why, fix = ("not a hub id (namespace/name) nor an existing directory", "check the id or the path")
    elif "gated" in text or "401" in text or "403" in text or "restricted" in text:
        why, fix = ("the model is gated or private on the hub",
                    f"accept its license on huggingface.co, log in (`hf auth login`), or pass a local copy: "
                    f"--model DIR")
    elif ("offline" in text or "connection" in text or "resolve" in text or "couldn't connect" in text
          or "cannot find the requested files" in text or "localentrynotfound" in text):
        why, fix = ("not in the local hub cache and the hub is not reachable (offline)",
                    f"download it where there is network (`hf download {model} --local-dir DIR`) and pass "
                    f"--model DIR, or unset HF_HUB_OFFLINE")
    elif "does not appear to have a file named config.json" in text or "not a valid model identifier" in text \
            or "is not a local folder" in text or "repository not found" in text or "404" in text:
        why, fix = ("no such model: neither a local directory with a config.json nor a hub id",
                    "check the path or id (a local directory needs config.json, the weights and a tokenizer)")
    else:
        why, fix = "it could not be loaded", "see the error above"
    last = error.strip().splitlines()[-1] if error.strip() else "no output"
    return f"cannot load model {model!r}: {why} ({last}). Fix: {fix}"


def probe(model: str, env: dict | None = None) -> dict:
    """The model's config as a dict (read in a child process); ModelUnavailable saying
    why and how to fix it otherwise."""
    code = ("import json, sys; from transformers import AutoConfig; "
            "print('CONFIG ' + json.dumps(AutoConfig.from_pretrained(sys.argv[1]).to_dict(), default=str))")
    proc = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if proc.returncode == 0 and line.startswith("CONFIG "):
            return json.loads(line[len("CONFIG "):])
    raise ModelUnavailable(explain(model, proc.stderr or proc.stdout))


def nf4_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def load_checkpoint(name: str, scenario, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda:0" if scenario.device == "cuda" else "cpu"
    kwargs = {"dtype": dtype, "device_map": device}
    if scenario.weights_nf4:
        if not nf4_available():
            raise ModelUnavailable(f"NF4 weights need bitsandbytes: {NF4_FIX}")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    flash = scenario.device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    kwargs["attn_implementation"] = "flash_attention_2" if flash else "sdpa"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:  # not cached and no hub access, gated, a bad path
        raise ModelUnavailable(explain(name, f"{type(error).__name__}: {error}")) from error
    tokenizer.padding_side = "left"  # the seed left this unset (right padding): fixed here
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
