"""Models that need no download: random weights with a named architecture. Memory does not
depend on weight values: generating exactly N tokens, such a model allocates the same tensors as
the real checkpoint. Built on the ``meta`` device and filled on the target one with a seeded
normal(0, 0.02) (norm weights 1): seconds for 8B on a GPU. Torch-free at import (``ARCHS``)."""
from __future__ import annotations

ARCHS: dict[str, dict] = {  # as LlamaConfig keyword arguments
    # the seed's model's architecture (docs/facts.md); its raised rope_theta changes no shape
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=128000, eos_token_id=128001),
    # SmolLM2-135M-Instruct (docs/facts.md)
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    # Llama-3-8B's KV geometry with a narrow residual stream, MLP and vocabulary: a CPU decodes fast
    "seed-geometry": dict(hidden_size=256, num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=8,
                          head_dim=128, intermediate_size=512, vocab_size=1024, rope_theta=500000.0,
                          max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          bos_token_id=1, eos_token_id=2),
    # models.TINY, so its memory is predicted from a cut of it like the others' (gpu_prediction.py)
    "tiny-llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_size=128, vocab_size=256, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # the dry run's: 2 KV heads x head_dim 32 keep G 128 dividing every length (2 * 8 * 32 = 512)
    "dry-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, intermediate_size=256, vocab_size=256, rope_theta=10000.0,
                     max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2),
}

RANDOM_SEED = 1234
INIT_STD = 0.02  # LlamaConfig's initializer_range

# How many layers an architecture variant keeps: "llama3-8b@8" = llama3-8b with 8 layers.
LAYERS_SEPARATOR = "@"

# "NAME-narrow": NAME with a narrow residual stream, MLP and vocabulary, the KV geometry kept.
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
        heads = kwargs["num_attention_heads"]  # hidden: a multiple of the heads
        kwargs["hidden_size"] = min(ARCHS[base]["hidden_size"], -(-NARROW["hidden_size"] // heads) * heads)
        kwargs.update({k: v for k, v in NARROW.items()
                       if k.endswith("_token_id") and kwargs[k] >= kwargs["vocab_size"]})
    if layers:
        kwargs["num_hidden_layers"] = int(layers)
    return kwargs


def random_weights_note(arch: str, dtype: str, why: str = "") -> str:
    kwargs = arch_config_kwargs(arch)
    return (f"random weights ({arch}: {kwargs['num_hidden_layers']} layers, hidden {kwargs['hidden_size']}, "
            f"{kwargs['num_key_value_heads']} KV heads x head_dim {kwargs['head_dim']}, {dtype}; "
            f"seeded normal std {INIT_STD}){' - ' + why if why else ''}; no tokenizer: each prompt is 8 "
            f"seeded random ids, the length of the seed's prompts padded to a multiple of 8 "
            f"(3-6 tokens each in SmolLM2's tokenizer)")


def random_model(arch: str, dtype, device, seed: int = RANDOM_SEED):
    """A Llama model of ``arch`` with seeded random weights, built directly on ``device``."""
    import torch

    model = meta_model(arch, dtype)
    model.to_empty(device=device)  # replaces Parameter objects: tied embeddings come apart
    model.tie_weights()  # ... and are tied again (SmolLM2: lm_head is embed_tokens)
    generator = torch.Generator(device=torch.device(device))
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):  # parameters() skips duplicates
            if param.dim() == 1:  # RMSNorm weights
                param.fill_(1.0)
            else:
                generator.manual_seed(seed + index)
                param.normal_(0.0, INIT_STD, generator=generator)
    for parent in list(model.modules()):  # to_empty left rotary inv_freq unset
        for child_name, child in list(parent.named_children()):
            if not child._non_persistent_buffers_set:
                continue
            if sum(1 for _ in child.parameters(recurse=False)):
                raise RuntimeError(f"{type(child).__name__} has parameters and non-persistent buffers: "
                                   f"cannot rebuild it without losing its weights")
            with torch.device(device):
                setattr(parent, child_name, type(child)(config=model.config).to(device))
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = model.config.eos_token_id
    return model


def meta_model(arch: str, dtype):
    """The model of ``arch`` on the meta device: shapes only, no memory, no init."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**arch_config_kwargs(arch)), dtype=dtype)

