"""The only module, with the backend kinds (kinds/), that knows transformers' quantized-cache API:
the rest of the suite asks it for a cache, ``generate()`` kwargs or a layer's storage."""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from kvcache_repro.backends.kinds import KINDS
from kvcache_repro.backends.matrix import BACKENDS, SEED_SETTINGS, BackendSpec, QuantSettings  # noqa: F401


class GroupSizeError(ValueError):
    """A size the backend cannot group: raised before ``generate()``, not mid-generation."""


class UnsupportedCombination(ValueError):
    """A backend setting that transformers accepts but that cannot work (a known bug)."""


@dataclass(frozen=True)
class LayerStorage:
    """One cache layer's contents: the backend's quantized object per tensor (or None), and the
    full-precision residual (all of DynamicCache)."""

    backend: str
    quantized_keys: Any
    quantized_values: Any
    residual_keys: torch.Tensor | None
    residual_values: torch.Tensor | None


@functools.lru_cache(maxsize=None)
def available_backends() -> tuple[str, ...]:
    """Backend names this transformers has a layer class for and does not refuse (refused_backends)."""
    refused = refused_backends()
    return tuple(name for name, spec in BACKENDS.items()
                 if spec.kind.layer_class() is not None and spec.backend not in refused)


@functools.lru_cache(maxsize=1)
def refused_backends() -> dict[str, str]:
    """{backend: why} for those whose cache this transformers refuses to build with the installed
    quantizer: tried, not compared (5.24.0 refuses optimum-quanto 0.2.5: its check is ``> 0.2.5``)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    out = {}
    for spec in {s.backend: s for s in BACKENDS.values() if s.kind.package}.values():
        try:
            build_cache(spec, config, QuantSettings(q_group_size=8, residual_length=4))
        except ImportError as error:
            out[spec.backend] = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return out


def cache_config(spec: BackendSpec, settings: QuantSettings) -> dict[str, Any]:
    """A fresh ``cache_config``: some releases pop keys out of the caller's (transformers #48700)."""
    if not spec.quantized:
        raise ValueError("the unquantized backend takes no cache_config")
    return {"backend": spec.backend, **spec.kind.cache_kwargs(spec, settings)}


def generate_kwargs(spec: BackendSpec, settings: QuantSettings) -> dict[str, Any]:
    """Keyword arguments that make ``model.generate`` use this backend's cache."""
    return generate_kwargs_with(cache_config(spec, settings)) if spec.quantized else {}


def generate_kwargs_with(config_dict: dict[str, Any]) -> dict[str, Any]:
    """``generate()`` kwargs around a caller-owned cache_config dict, not copied."""
    return {"cache_implementation": "quantized", "cache_config": config_dict}


_RECORDERS: list[list] = []


def build_cache(spec: BackendSpec, model_config, settings: QuantSettings):
    """A fresh cache for ``model_config``, also recorded inside ``recording_caches()``."""
    cache = spec.kind.build_cache(spec, model_config, settings)
    if _RECORDERS:
        _RECORDERS[-1].append(cache)
    return cache


@contextlib.contextmanager
def recording_caches():
    """``with recording_caches() as built:`` - the caches build_cache made meanwhile."""
    built: list = []
    _RECORDERS.append(built)
    try:
        yield built
    finally:
        _RECORDERS.remove(built)


def cache_kwarg(model=None) -> str:
    """``cache`` where ``forward`` declares it, else ``past_key_values`` (5.5.4 ignores ``cache=``)."""
    return _cache_kwarg_of(type(model).forward if model is not None else None)


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward) -> str:
    if forward is None:
        from transformers import LlamaForCausalLM

        forward = LlamaForCausalLM.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def output_cache(output) -> Any:
    """The cache a model output or ``generate`` result carries."""
    for field in ("cache", "past_key_values"):
        if (value := getattr(output, field, None)) is not None:
            return value
    raise AttributeError(f"{type(output).__name__} carries no cache (return_dict_in_generate=True?)")


def is_rejection(error: BaseException) -> bool:
    """True for transformers' documented refusal of a model with non-full-attention layers."""
    return isinstance(error, ValueError) and (
        "only supported for models with only full attention" in str(error))


def layer_storage(layer) -> LayerStorage:
    """Read by the kind whose layer class it is (quantized first: they subclass DynamicLayer)."""
    for kind in sorted(KINDS.values(), key=lambda k: k.quantized, reverse=True):
        layer_class = kind.layer_class()
        if layer_class is not None and isinstance(layer, layer_class):
            return LayerStorage(kind.name, *kind.storage(layer))
    raise TypeError(f"no storage model for cache layer {type(layer).__name__}")


def update_layer(cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
    """Feed one layer as attention would; returns what attention sees."""
    return cache.update(keys, values, layer_idx)


def reorder(cache, beam_idx: torch.Tensor) -> None:
    """Reorder the batch rows of a cache, as beam search does between steps."""
    cache.reorder_cache(beam_idx)


def cache_layers(cache) -> list:
    return list(cache.layers)


def quantized_layer_count(cache) -> int:
    """How many layers actually hold quantized storage (not just a quantized class)."""
    return sum(1 for layer in cache_layers(cache) if layer_storage(layer).quantized_keys is not None)


def quantized_stores(cache) -> tuple[int, ...]:
    """The identity of each layer's quantized keys: it changes exactly when the layer re-quantizes
    (a kind with no residual, fp8, appends each token to its codes and never does: 0)."""
    stores = [layer_storage(layer) for layer in cache_layers(cache)] if cache is not None else []
    return tuple(id(s.quantized_keys) if KINDS[s.backend].group_wise else 0 for s in stores)


def residual_tokens(cache, layer_idx: int = 0) -> int:
    """Tokens kept in full precision by one layer."""
    storage = layer_storage(cache_layers(cache)[layer_idx])
    return 0 if storage.residual_keys is None else storage.residual_keys.shape[-2]


def flush_lengths(spec: BackendSpec, model_config, settings: QuantSettings, prefill: int, total: int,
                  step: int) -> list[int]:
    """Lengths at which a fresh layer fed ``prefill`` tokens, then ``step`` per update up to ``total``,
    re-quantized its store: measured, as the rule moved (4.x: residual + 1 >= R, 5.x: + new)."""
    cache = build_cache(spec, model_config, settings)
    lengths, seq = [], 0
    for n in [prefill] + [min(step, total - i) for i in range(prefill, total, step)]:
        x = torch.randn(1, 1, n, settings.q_group_size)
        update_layer(cache, 0, x, x.clone())
        seq += n
        if residual_tokens(cache, 0) == 0:
            lengths.append(seq)
    return lengths


def check_quantizable(spec: BackendSpec, settings: QuantSettings, *, batch: int, kv_heads: int, head_dim: int,
                      prompt_len: int, new_tokens: int) -> None:
    """Raise GroupSizeError/UnsupportedCombination if a run would fail inside the backend, at each
    length it quantizes: prefill, and per residual_length of the ``new_tokens - 1`` fed back."""
    if not spec.group_wise:
        return
    G = settings.q_group_size
    if spec.broken:
        raise UnsupportedCombination(spec.broken)
    R = settings.residual_length
    lengths = [prompt_len + k * R for k in range(max(new_tokens - 1, 0) // R + 1)]
    for seq in lengths:
        numel = batch * kv_heads * seq * head_dim
        per_group_dim, what = spec.kind.grouped(spec, numel, batch, head_dim)
        if per_group_dim % G:
            raise GroupSizeError(
                f"{spec.name}: q_group_size {G} does not divide {what} = {per_group_dim} "
                f"(batch {batch}, kv heads {kv_heads}, sequence {seq}, head_dim {head_dim}); "
                f"the cache quantizes at lengths {lengths}. "
                f"Pad the prompt to a length that makes it divisible or pick a q_group_size dividing it.")
        if problem := spec.kind.packing_problem(spec, numel // G, seq):
            raise GroupSizeError(f"{spec.name}: {problem}")


def quantize_once(spec: BackendSpec, settings: QuantSettings, tensor: torch.Tensor):
    """``(qstate, restored)``: ``tensor`` through a layer's ``update`` and ``_dequantize``, the path
    transformers drives quanto/hqq on."""
    if not spec.quantized:
        raise ValueError("the unquantized backend has nothing to quantize")
    layer = spec.kind.layer_class()(**spec.kind.cache_kwargs(spec, settings))
    layer.update(tensor, tensor.clone())
    qstate = layer._quantized_keys
    return qstate, layer._dequantize(qstate)
