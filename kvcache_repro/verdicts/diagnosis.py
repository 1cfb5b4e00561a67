"""Did a "quantized" run really go through a quantized cache? Read from the cache itself,
after the run, in each path (generate, teacher-forced, beam search). A release can accept a
quantized cache and not use it (silent downstream: a KL of exactly 0.0 at every nbits), and
``diagnose`` says whose fault it is: the cache passed in holds no tokens (the *harness*
passed it in a way this release does not read); it holds tokens but no quantized layer, or
quantized layers but logits bitwise equal to the unquantized run's (the *release*).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import transformers

from kvcache_repro.backends import caches, generation
from kvcache_repro.backends.matrix import BackendSpec
from kvcache_repro.verdicts.tags import BEHAVIOUR_TAG, HARNESS_TAG


@dataclass(frozen=True)
class CacheReport:
    cache_class: str
    layer_classes: tuple[str, ...]
    tokens: int  # get_seq_length() of layer 0
    quantized_layers: int  # layers holding quantized storage

    def describe(self) -> str:
        counts = Counter(self.layer_classes)
        layers = ", ".join(f"{n} x {c}" for c, n in counts.items()) or "no layers"
        return (f"{self.cache_class} with {layers}; {self.tokens} tokens; "
                f"{self.quantized_layers} of {len(self.layer_classes)} layers hold quantized storage")


def inspect_cache(cache) -> CacheReport:
    layers = caches.cache_layers(cache) if cache is not None and hasattr(cache, "layers") else []
    quantized = 0
    for layer in layers:
        try:
            if caches.layer_storage(layer).quantized_keys is not None:
                quantized += 1
        except TypeError:  # a layer class the storage model does not know: not quantized storage
            pass
    tokens = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    return CacheReport(type(cache).__name__, tuple(type(l).__name__ for l in layers), tokens, quantized)


def diagnose(spec: BackendSpec, cache, path: str, *, passed_in: bool = False,
             logits: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> str | None:
    """None when a quantized run used a quantized cache, else why (``passed_in``: by the harness)."""
    if not spec.quantized:
        return None
    where = f"transformers {transformers.__version__}, {spec.name}, {path} path"
    report = inspect_cache(cache)
    if report.tokens == 0 and passed_in:
        return (f"{HARNESS_TAG} {where}: the cache passed as `{caches.cache_kwarg()}=` holds no tokens after the "
                f"run ({report.describe()}): this release did not use the cache object the harness passed, "
                f"so the run was unquantized. caches.cache_kwarg() must name what this release's forward takes.")
    if report.quantized_layers == 0:
        return (f"{BEHAVIOUR_TAG} {where}: the quantized run's cache holds no quantized layer "
                f"({report.describe()}): quantization silently did nothing.")
    if logits is not None and reference is not None and torch.equal(logits, reference):
        return (f"{BEHAVIOUR_TAG} {where}: logits equal the unquantized run's bitwise although "
                f"{report.describe()}: attention did not read the quantized cache.")
    return None


def assert_quantized(spec: BackendSpec, cache, path: str, **kw) -> None:
    """Fail (behaviour) or skip (harness) with diagnose()'s message."""
    import pytest

    message = diagnose(spec, cache, path, **kw)
    if message is None:
        return
    if message.startswith(HARNESS_TAG):
        pytest.skip(message)
    raise AssertionError(message)


@torch.inference_mode()
def teacher_forced(model, input_ids: torch.Tensor, spec: BackendSpec, settings, prefill: int):
    """generation.teacher_forced_logits, and the cache it used: (logits, cache)."""
    with caches.recording_caches() as built:
        logits = generation.teacher_forced_logits(model, input_ids, spec, settings, prefill)
    return logits, (built[-1] if built else None)


@torch.inference_mode()
def beam_search(model, input_ids: torch.Tensor, spec: BackendSpec, settings, new_tokens: int, num_beams: int = 4):
    """Beam search as generation.beam_search does it: (sequences, scores, cache)."""
    generation.check_run(model, spec, settings, input_ids.shape[0] * num_beams, input_ids.shape[1], new_tokens)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, num_beams=num_beams,
                         return_dict_in_generate=True, output_scores=True, **caches.generate_kwargs(spec, settings))
    return out.sequences, tuple(out.scores or ()), caches.output_cache(out)
