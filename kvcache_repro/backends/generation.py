"""Greedy generation and teacher-forced decoding through a chosen KV cache.

The one place that calls ``model.generate`` / ``model(...)`` with a cache, so the
tiny-model tests, the real-model accuracy runs and the memory experiment all drive
transformers the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache_repro.backends import caches
from kvcache_repro.backends.matrix import BackendSpec
from kvcache_repro.backends.models import kv_geometry


@dataclass
class Generation:
    sequences: torch.Tensor  # (batch, prompt + new)
    scores: tuple[torch.Tensor, ...]  # logits of each generated step, (batch, vocab)
    cache: object  # the cache generate() finished with

    prompt_len: int = 0

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]


def check_run(model, spec: BackendSpec, settings: caches.QuantSettings, batch: int, prompt_len: int, new_tokens: int) -> None:
    """Fail before generate() for shapes the backend cannot quantize (clear message)."""
    geometry = kv_geometry(model)
    caches.check_quantizable(spec, settings, batch=batch, kv_heads=geometry.kv_heads,
                             head_dim=geometry.head_dim, prompt_len=prompt_len, new_tokens=new_tokens)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, spec: BackendSpec, settings: caches.QuantSettings,
             new_tokens: int, attention_mask: torch.Tensor | None = None, keep_scores: bool = True) -> Generation:
    """Greedy generation of exactly ``new_tokens`` tokens (min = max, as in the seed's
    protocol, so every backend produces the same number of tokens).

    ``keep_scores=False`` for memory measurements: the per-step logits generate() would
    otherwise keep (batch x vocab floats per step, 1.6 GB at 64 x 128 steps with a 49k
    vocabulary) dwarf the cache being measured."""
    check_run(model, spec, settings, input_ids.shape[0], input_ids.shape[1], new_tokens)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=keep_scores,
        **caches.generate_kwargs(spec, settings),
    )
    return Generation(out.sequences, tuple(out.scores or ()), caches.output_cache(out), input_ids.shape[1])


@torch.inference_mode()
def generate_with_cache_config(model, input_ids: torch.Tensor, cache_config: dict, new_tokens: int,
                               num_beams: int = 1) -> torch.Tensor:
    """Generate with a caller-owned ``cache_config`` dict passed as is (not copied), to
    observe what generate() does to it. Returns the sequences."""
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, num_beams=num_beams,
                          **caches.generate_kwargs_with(cache_config))


@torch.inference_mode()
def beam_search(model, input_ids: torch.Tensor, spec: BackendSpec, settings: caches.QuantSettings,
                new_tokens: int, num_beams: int = 4) -> torch.Tensor:
    """Beam search (greedy beams, no sampling); the cache is reordered between steps."""
    check_run(model, spec, settings, input_ids.shape[0] * num_beams, input_ids.shape[1], new_tokens)
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, num_beams=num_beams,
                          **caches.generate_kwargs(spec, settings))


@torch.inference_mode()
def teacher_forced_logits(model, input_ids: torch.Tensor, spec: BackendSpec, settings: caches.QuantSettings,
                          prefill: int, step: int = 1) -> torch.Tensor:
    """Logits predicting tokens ``prefill .. n-1`` when the first ``prefill`` tokens are
    prefilled and the rest fed through the cache ``step`` tokens per forward (the decode
    path, where quantized past keys/values are used). Returns (batch, n - prefill, vocab),
    float32.

    ``step > 1`` sees the same keys at the same precision as ``step = 1`` when ``step``
    divides the residual length and transformers flushes on ``residual + new >= R``
    (5.x): a flush then happens after the same tokens, and tokens of the current forward
    are full precision either way, as they would be in the residual. Not so for fp8, which
    has no residual: there the earlier tokens of a forward are seen unquantized (KL 3.8%
    lower on the core table). Tested against ``step = 1`` in tests/test_accuracy.py and
    tests/test_cache_semantics.py, not assumed."""
    n = input_ids.shape[1]
    check_run(model, spec, settings, input_ids.shape[0], prefill, n - prefill + 1)
    cache = caches.build_cache(spec, model.config, settings)
    kw = {caches.cache_kwarg(): cache, "use_cache": True}
    out = model(input_ids[:, :prefill], **kw)
    logits = [out.logits[:, -1:].float()]
    for i in range(prefill, n - 1, step):
        out = model(input_ids[:, i:min(i + step, n - 1)], **kw)
        logits.append(out.logits.float())
    return torch.cat(logits, dim=1)
