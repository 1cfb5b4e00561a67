"""Loading a hub checkpoint (or a local path) for the GPU ``seed`` scenario, the way
the seed did: NF4 weights through bitsandbytes (double quant, fp16 compute),
flash-attention 2 when installed (sdpa otherwise), on cuda:0. Needs
requirements-gpu.txt; reaches the hub only if HF_HUB_OFFLINE is unset."""
from __future__ import annotations

import importlib.util

from kvcache_repro.backends.models import ModelUnavailable


def load_checkpoint(name: str, scenario, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype, "device_map": "cuda:0"}
    if scenario.weights_nf4:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelUnavailable("NF4 weights need bitsandbytes: pip install -r requirements-gpu.txt")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    flash = importlib.util.find_spec("flash_attn") is not None
    kwargs["attn_implementation"] = "flash_attention_2" if flash else "sdpa"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as error:  # not cached and no hub access, or a bad path
        raise ModelUnavailable(f"cannot load checkpoint {name!r}: {error}. Point --kv-gpu-model at a local "
                               f"copy, or unset HF_HUB_OFFLINE on a machine with hub access") from error
    tokenizer.padding_side = "left"  # the seed left this unset (right padding): fixed here
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
