"""Greedy generation and teacher-forced decoding through a chosen KV cache: the one place that
calls ``model.generate`` / ``model(...)`` with a cache, so every test and run drives it alike."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache_repro.backends import caches
from kvcache_repro.backends.matrix import BackendSpec, QuantSettings
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


def check_run(model, spec: BackendSpec, settings: QuantSettings, batch: int, prompt_len: int,
              new_tokens: int) -> None:
    """Fail before generate() for shapes the backend cannot quantize (clear message)."""
    geometry = kv_geometry(model)
    caches.check_quantizable(spec, settings, batch=batch, kv_heads=geometry.kv_heads,
                             head_dim=geometry.head_dim, prompt_len=prompt_len, new_tokens=new_tokens)


def _exactly(model, input_ids: torch.Tensor, new_tokens: int, attention_mask=None, **kwargs):
    """``model.generate``, greedy, exactly ``new_tokens`` tokens (min = max: the seed's protocol)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, **kwargs)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, spec: BackendSpec, settings: QuantSettings,
             new_tokens: int, attention_mask: torch.Tensor | None = None,
             keep_scores: bool = True) -> Generation:
    """``keep_scores=False`` for memory: the per-step logits (1.6 GB at 64 x 128 steps, 49k vocab)
    would dwarf the cache."""
    check_run(model, spec, settings, input_ids.shape[0], input_ids.shape[1], new_tokens)
    out = _exactly(model, input_ids, new_tokens, attention_mask, return_dict_in_generate=True,
                   output_scores=keep_scores, **caches.generate_kwargs(spec, settings))
    return Generation(out.sequences, tuple(out.scores or ()), caches.output_cache(out), input_ids.shape[1])


@torch.inference_mode()
def generate_with_cache_config(model, input_ids: torch.Tensor, cache_config: dict, new_tokens: int,
                               num_beams: int = 1) -> torch.Tensor:
    """The sequences, generated with a caller-owned ``cache_config`` passed as is (not copied)."""
    kwargs = caches.generate_kwargs_with(cache_config)
    return _exactly(model, input_ids, new_tokens, num_beams=num_beams, **kwargs)


@torch.inference_mode()
def beam_search(model, input_ids: torch.Tensor, spec: BackendSpec, settings: QuantSettings,
                new_tokens: int, num_beams: int = 4) -> torch.Tensor:
    """Beam search (greedy beams, no sampling); the cache is reordered between steps."""
    check_run(model, spec, settings, input_ids.shape[0] * num_beams, input_ids.shape[1], new_tokens)
    return _exactly(model, input_ids, new_tokens, num_beams=num_beams,
                    **caches.generate_kwargs(spec, settings))


@torch.inference_mode()
def teacher_forced_logits(model, input_ids: torch.Tensor, spec: BackendSpec, settings: QuantSettings,
                          prefill: int, step: int = 1) -> torch.Tensor:
    """Float32 logits (batch, n - prefill, vocab) for tokens ``prefill .. n-1``: ``prefill`` tokens
    prefilled, the rest fed through the cache ``step`` per forward. ``step > 1`` sees the keys of
    ``step = 1`` where it divides R and flushes come on ``residual + new >= R`` (5.x); not for fp8,
    which has no residual (KL 3.8% lower on the core table). Tested, not assumed."""
    n = input_ids.shape[1]
    check_run(model, spec, settings, input_ids.shape[0], prefill, n - prefill + 1)
    kw = {caches.cache_kwarg(): caches.build_cache(spec, model.config, settings), "use_cache": True}
    logits = [model(input_ids[:, :prefill], **kw).logits[:, -1:].float()]
    for i in range(prefill, n - 1, step):
        logits.append(model(input_ids[:, i:min(i + step, n - 1)], **kw).logits.float())
    return torch.cat(logits, dim=1)
