"""Models that need no download: random weights with a named architecture.

Memory does not depend on weight values. Generation runs with ``min_new_tokens =
max_new_tokens`` (generation.py), so a random-weight model of the seed's exact
architecture allocates the same tensors, of the same shapes, as the real checkpoint:
the same KV cache bytes, the same per-step transients. What differs is the token ids
(irrelevant to memory) and anything that reads values (accuracy: not measured here).

Construction is cheap at 8B parameters: the model is built on the ``meta`` device (no
memory, no init), materialized on the target device with ``to_empty`` and filled with a
seeded normal(0, 0.02) per parameter (norm weights 1) directly there - seconds on a GPU,
instead of transformers' default CPU initialization (minutes for 8B). Non-persistent
buffers computed at construction (the rotary ``inv_freq``) are rebuilt on the device.

Torch-free at import: ``ARCHS`` is plain data that scenarios.py reads.
"""
from __future__ import annotations

# Architectures, as LlamaConfig keyword arguments.
ARCHS: dict[str, dict] = {
    # The seed's model, gradientai/Llama-3-8B-Instruct-Gradient-1048k: Llama-3-8B's
    # architecture (docs/facts.md, "The seed's model and settings"; Meta's Llama-3-8B config.json: hidden 4096,
    # 32 layers, 32 heads, 8 KV heads, head_dim 128, intermediate 14336, vocab 128256,
    # rope_theta 500000). The Gradient fine-tune raised rope_theta for its 1M context;
    # rope_theta changes no tensor shape, so memory is the same either way.
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=128000, eos_token_id=128001),
    # SmolLM2-135M-Instruct (docs/facts.md, "The small real model": Llama
    # architecture, 30 layers, 9 heads, 3 KV heads, head_dim 64; hidden 576, intermediate
    # 1536, vocab 49152, tied embeddings - HuggingFaceTB/SmolLM2-135M-Instruct config.json).
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    # Llama-3-8B's per-layer KV geometry (32 layers, 8 KV heads of 128) with a narrow
    # residual stream, MLP and vocabulary, so that a CPU decodes hundreds of tokens: the
    # cache and its transients depend only on the KV geometry, token count and dtype;
    # the narrow parts shrink the weights, which every report shows apart.
    "seed-geometry": dict(hidden_size=256, num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=8,
                          head_dim=128, intermediate_size=512, vocab_size=1024, rope_theta=500000.0,
                          max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          bos_token_id=1, eos_token_id=2),
    # models.TINY (the tiny random llama of gpu-tiny and the CPU tier) as an architecture,
    # so that its memory can be predicted from a cut of it like the others'
    # (runner/gpu_prediction.py; tests/test_gpu_prediction.py checks the shapes agree).
    "tiny-llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_size=128, vocab_size=256, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # The dry run's stand-in for both (CPU, seconds): head_dim 32 and 2 KV heads keep the
    # seed's group size 128 dividing every quantized length (2 * 8 * 32 = 512 per row).
    "dry-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, intermediate_size=256, vocab_size=256, rope_theta=10000.0,
                     max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2),
}

RANDOM_SEED = 1234
INIT_STD = 0.02  # LlamaConfig's initializer_range

# How many layers an architecture variant keeps: "llama3-8b@8" = llama3-8b with 8 layers.
LAYERS_SEPARATOR = "@"


# "NAME-narrow": NAME with a narrow residual stream, MLP and vocabulary, and everything
# the KV cache and attention depend on kept (heads, KV heads, head_dim: q_proj maps the
# hidden size to heads x head_dim whatever the hidden size) - what the CPU decodes fast.
NARROW_SUFFIX = "-narrow"
NARROW = dict(hidden_size=256, intermediate_size=512, vocab_size=1024, bos_token_id=1, eos_token_id=2)


def arch_config_kwargs(arch: str) -> dict:
    """LlamaConfig kwargs for ``arch``, ``arch@LAYERS`` (same layers, fewer of them) or
    ``arch-narrow[@LAYERS]`` (NARROW_SUFFIX)."""
    base, _, layers = arch.partition(LAYERS_SEPARATOR)
    narrow = base.endswith(NARROW_SUFFIX) and base[:-len(NARROW_SUFFIX)] in ARCHS
    if narrow:
        base = base[:-len(NARROW_SUFFIX)]
    if base not in ARCHS:
        raise KeyError(f"unknown architecture {base!r}; known: {', '.join(ARCHS)}")
    kwargs = dict(ARCHS[base])
    if narrow:  # never wider than the architecture itself (the tiny ones already are narrow)
        kwargs.update({k: min(v, kwargs[k]) for k, v in NARROW.items() if k.endswith("_size")})
        heads = kwargs["num_attention_heads"]  # LlamaConfig wants the hidden size a multiple of the heads
        kwargs["hidden_size"] = min(ARCHS[base]["hidden_size"], -(-NARROW["hidden_size"] // heads) * heads)
        kwargs.update({k: v for k, v in NARROW.items() if k.endswith("_token_id") and kwargs[k] >= kwargs["vocab_size"]})
    if layers:
        kwargs["num_hidden_layers"] = int(layers)
    return kwargs


def random_weights_note(arch: str, dtype: str, why: str = "") -> str:
    kwargs = arch_config_kwargs(arch)
    return (f"random weights ({arch}: {kwargs['num_hidden_layers']} layers, hidden {kwargs['hidden_size']}, "
            f"{kwargs['num_key_value_heads']} KV heads x head_dim {kwargs['head_dim']}, {dtype}; seeded normal "
            f"std {INIT_STD}){' - ' + why if why else ''}; no tokenizer: each prompt is 8 seeded random ids, the "
            f"length of the seed's prompts padded to a multiple of 8 (3-6 tokens each in SmolLM2's tokenizer)")


def random_model(arch: str, dtype, device, seed: int = RANDOM_SEED):
    """A Llama model of ``arch`` with seeded random weights, built directly on ``device``."""
    import torch

    model = meta_model(arch, dtype)
    config = model.config
    model.to_empty(device=device)  # replaces Parameter objects: tied embeddings come apart
    model.tie_weights()  # ... and are tied again (SmolLM2: lm_head is embed_tokens)
    _fill(model, torch.device(device), seed)
    _rebuild_rotary(model, device)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def meta_model(arch: str, dtype):
    """The model of ``arch`` on the meta device: shapes only, no memory, no init."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**arch_config_kwargs(arch)), dtype=dtype)


def _fill(model, device, seed: int) -> None:
    import torch

    generator = torch.Generator(device=device)
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters(remove_duplicate=True)):
            if param.dim() == 1:  # RMSNorm weights
                param.fill_(1.0)
            else:
                generator.manual_seed(seed + index)
                param.normal_(0.0, INIT_STD, generator=generator)


def _rebuild_rotary(model, device) -> None:
    """``to_empty`` leaves non-persistent buffers (rotary inv_freq) uninitialized: build
    every module that owns such buffers again, on the device, from the config."""
    import torch

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not child._non_persistent_buffers_set:
                continue
            if sum(1 for _ in child.parameters(recurse=False)):
                raise RuntimeError(f"{type(child).__name__} has parameters and non-persistent buffers: "
                                   f"cannot rebuild it without losing its weights")
            with torch.device(device):
                rebuilt = type(child)(config=model.config)
            setattr(parent, child_name, rebuilt.to(device))
