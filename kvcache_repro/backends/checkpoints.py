"""Loading a hub checkpoint or a local directory: the ``seed`` scenario's (NF4 weights, double
quant, fp16 compute, as the seed did) and a user's (``--model``, native unless ``--weights nf4``).
``probe`` reads a config in a child process, so that a model that cannot load stops the
experiment once, before any worker, with the reason and the fix."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from kvcache_repro.backends.model_cache import ModelUnavailable, ready

NF4_FIX = "pip install -r requirements-gpu.txt (bitsandbytes), or run with native weights (--weights native)"

# (any of these in the error's lowercased text, why, fix): the first match wins
_LOAD_FAILURES = (
    (("repo id must be in the form",), "not a hub id (namespace/name) nor an existing directory",
     "check the id or the path"),
    (("gated", "401", "403", "restricted"), "the model is gated or private on the hub",
     "accept its license on huggingface.co, log in (`hf auth login`), or pass a local copy: --model DIR"),
    (("offline", "connection", "resolve", "couldn't connect", "cannot find the requested files",
      "localentrynotfound"), "not in the local hub cache and the hub is not reachable (offline)",
     "download it where there is network (`hf download {model} --local-dir DIR`) and pass --model DIR, "
     "or unset HF_HUB_OFFLINE"),
    (("does not appear to have a file named config.json", "not a valid model identifier",
      "is not a local folder", "repository not found", "404"),
     "no such model: neither a local directory with a config.json nor a hub id",
     "check the path or id (a local directory needs config.json, the weights and a tokenizer)"),
)


def identity(model: str, config: dict | None) -> dict:
    """What names a model's baseline file: a hub id as given; a local directory by its name and
    its config.json's digest (a moved copy keeps its baselines, another model of that name not)."""
    path = Path(model).expanduser()
    if path.is_dir():
        raw = (path / "config.json").read_bytes() if (path / "config.json").exists() else b""
        return {"name": path.resolve().name, "local": True,
                "config_sha256": hashlib.sha256(raw).hexdigest()[:16]}
    return {"name": model.replace("/", "--"), "hub_id": model}


def explain(model: str, error: str) -> str:
    """A load failure's reason and fix, from transformers' / huggingface_hub's message."""
    text, path = error.lower(), Path(model).expanduser()
    path_like = model.startswith(("/", "./", "../", "~")) or path.exists()
    if path_like and not path.is_dir():
        why, fix = ("no such local directory", "check the path: a model directory holds config.json, "
                    "the weights and a tokenizer (e.g. what `save_pretrained` writes)")
    elif path_like and not (path / "config.json").exists():
        why, fix = ("the directory has no config.json",
                    "point --model at the directory `save_pretrained` wrote")
    else:
        why, fix = next(((w, f.format(model=model)) for needles, w, f in _LOAD_FAILURES
                         if any(n in text for n in needles)),
                        ("it could not be loaded", "see the error above"))
    last = error.strip().splitlines()[-1] if error.strip() else "no output"
    return f"cannot load model {model!r}: {why} ({last}). Fix: {fix}"


def probe(model: str, env: dict | None = None) -> dict:
    """The model's config as a dict, or ModelUnavailable saying why and how to fix it."""
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

    kwargs = {"dtype": dtype, "device_map": "cuda:0" if scenario.device == "cuda" else "cpu"}
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
    return ready(model, tokenizer)
