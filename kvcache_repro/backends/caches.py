"""The only module, with the backend kinds (kinds/), that knows transformers' quantized-cache API.

Tests and experiments ask this module for a cache, for ``generate()`` keyword
arguments, or for the storage a cache layer holds; they never import
transformers' cache classes themselves. When a transformers release moves the API,
this file (or a kind's module) is the one to change.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch

from kvcache_repro.backends.kinds import KINDS
from kvcache_repro.backends.matrix import BACKENDS, BackendSpec, QuantSettings  # noqa: F401  (re-exported)

# The seed's settings (docs/facts.md): nbits 4, q_group_size 128, residual_length 64.
SEED_Q_GROUP_SIZE = 128
SEED_RESIDUAL_LENGTH = 64


class GroupSizeError(ValueError):
    """A tensor that would be quantized has a size the backend cannot group.

    Raised by the harness before ``generate()`` runs, instead of the bare
    AssertionError (hqq) or a mid-generation shape error (hqq axis 1) the backends give.
    """


class UnsupportedCombination(ValueError):
    """A backend setting that transformers accepts but that cannot work (a known bug)."""


@dataclass(frozen=True)
class LayerStorage:
    """What one cache layer holds, as transformers left it.

    ``quantized`` is the backend's own object per tensor (quanto's tensor subclass,
    hqq's ``(W_q, meta)`` tuple, fp8's ``(data, scale)``), or None; ``residual`` the
    full-precision tensors (DynamicCache keeps everything there).
    """

    backend: str
    quantized_keys: Any
    quantized_values: Any
    residual_keys: torch.Tensor | None
    residual_values: torch.Tensor | None


@functools.lru_cache(maxsize=None)
def available_backends() -> tuple[str, ...]:
    """Backend names this transformers can build with the installed quantizers: their
    kind's layer class exists (fp8's from 5.21 on) and transformers does not refuse its
    package (refused_backends; named by tests/test_version_expectations.py)."""
    refused = refused_backends()
    return tuple(name for name, spec in BACKENDS.items()
                 if spec.kind.layer_class() is not None and spec.backend not in refused)


@functools.lru_cache(maxsize=1)
def refused_backends() -> dict[str, str]:
    """{transformers backend: why} for the quantized backends whose cache this transformers
    refuses to build with the installed quantizer release: decided by building one (a
    1-layer config), not by comparing versions. Measured: transformers 5.24.0 refuses
    optimum-quanto 0.2.5 ("You need optimum-quanto package version to be greater or equal
    than 0.2.5", while its check is ``> 0.2.5``)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    settings = QuantSettings(q_group_size=8, residual_length=4)
    out = {}
    for spec in {s.backend: s for s in BACKENDS.values() if s.kind.package}.values():
        try:
            build_cache(spec, config, settings)
        except ImportError as error:
            out[spec.backend] = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return out


def cache_config(spec: BackendSpec, settings: QuantSettings) -> dict[str, Any]:
    """A new ``cache_config`` dict for ``generate()``. Always a fresh dict: some
    transformers releases pop keys out of the caller's dict (transformers #48700)."""
    if not spec.quantized:
        raise ValueError("the unquantized backend takes no cache_config")
    return {"backend": spec.backend, **spec.kind.cache_kwargs(spec, settings)}


def generate_kwargs(spec: BackendSpec, settings: QuantSettings) -> dict[str, Any]:
    """Keyword arguments that make ``model.generate`` use this backend's cache."""
    if not spec.quantized:
        return {}
    return generate_kwargs_with(cache_config(spec, settings))


def generate_kwargs_with(config_dict: dict[str, Any]) -> dict[str, Any]:
    """``generate()`` kwargs around a caller-owned cache_config dict, passed without a copy."""
    return {"cache_implementation": "quantized", "cache_config": config_dict}


def build_cache(spec: BackendSpec, model_config, settings: QuantSettings):
    """A fresh cache object for ``model_config``: DynamicCache or QuantizedCache.

    Raises transformers' own ValueError for models it refuses (non-full-attention layers).
    Inside ``recording_caches()`` every cache built is also appended to its list, so a
    caller can inspect the cache a helper used (diagnosis.py, teacher-forced path).
    """
    cache = spec.kind.build_cache(spec, model_config, settings)
    if _RECORDERS:
        _RECORDERS[-1].append(cache)
    return cache


_RECORDERS: list[list] = []


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
    """The name under which ``forward`` takes a cache object: ``cache`` where the forward
    declares it, else ``past_key_values``. Read from the signature, not the version:
    measured, 5.5.4's forward takes only ``past_key_values`` and silently ignores a
    ``cache=`` (the run is then unquantized; see diagnosis.py, compat/RESULTS.md)."""
    return _cache_kwarg_of(type(model).forward if model is not None else None)


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward) -> str:
    import inspect

    if forward is None:
        from transformers import LlamaForCausalLM

        forward = LlamaForCausalLM.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def output_cache(output) -> Any:
    """The cache a model output or ``generate`` result carries."""
    for field in ("cache", "past_key_values"):
        value = getattr(output, field, None)
        if value is not None:
            return value
    raise AttributeError(f"{type(output).__name__} carries no cache (return_dict_in_generate=True?)")


def is_rejection(error: BaseException) -> bool:
    """True for transformers' documented refusal of a model with non-full-attention layers."""
    return isinstance(error, ValueError) and "only supported for models with only full attention" in str(error)


def layer_storage(layer) -> LayerStorage:
    """The tensors one cache layer holds, as the kind whose layer class it is reads them
    (quantized kinds first: their classes subclass DynamicLayer)."""
    for kind in sorted(KINDS.values(), key=lambda k: k.quantized, reverse=True):
        layer_class = kind.layer_class()
        if layer_class is not None and isinstance(layer, layer_class):
            return LayerStorage(kind.name, *kind.storage(layer))
    raise TypeError(f"no storage model for cache layer {type(layer).__name__}")


def update_layer(cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
    """Feed one layer of a cache as a model's attention would; returns what attention sees."""
    return cache.update(keys, values, layer_idx)


def reorder(cache, beam_idx: torch.Tensor) -> None:
    """Reorder the batch rows of a cache, as beam search does between steps."""
    cache.reorder_cache(beam_idx)


def cache_layers(cache) -> list:
    return list(cache.layers)


def quantized_layer_count(cache) -> int:
    """How many layers actually hold quantized storage (not just a quantized class)."""
    return sum(1 for layer in cache_layers(cache) if layer_storage(layer).quantized_keys is not None)


def residual_tokens(cache, layer_idx: int = 0) -> int:
    """Tokens kept in full precision by one layer."""
    storage = layer_storage(cache_layers(cache)[layer_idx])
    return 0 if storage.residual_keys is None else storage.residual_keys.shape[-2]


def flush_lengths(spec: BackendSpec, model_config, settings: QuantSettings, prefill: int, total: int,
                  step: int) -> list[int]:
    """Sequence lengths at which a fresh quantized layer re-quantized its whole store, fed
    ``prefill`` tokens and then ``step`` tokens per update up to ``total``: measured on
    transformers' own layer (1 row, 1 head, head_dim = G so any length groups), not
    assumed, because the flush rule moved between releases (4.x: residual + 1 >= R,
    5.x: residual + new >= R)."""
    cache = build_cache(spec, model_config, settings)
    width = settings.q_group_size
    lengths, seq = [], 0
    for n in [prefill] + [min(step, total - i) for i in range(prefill, total, step)]:
        x = torch.randn(1, 1, n, width)
        update_layer(cache, 0, x, x.clone())
        seq += n
        if residual_tokens(cache, 0) == 0:
            lengths.append(seq)
    return lengths


# ---- group-size divisibility -----------------------------------------------------------

def quantized_lengths(prompt_len: int, new_tokens: int, residual_length: int) -> list[int]:
    """Sequence lengths at which a group-wise layer quantizes its whole store.

    The prompt is quantized at prefill; each decode step appends one token to the
    residual and, when the residual would reach ``residual_length``, re-quantizes
    everything. ``generate`` feeds back ``new_tokens - 1`` tokens (the last one is
    never run through the model).
    """
    steps = max(new_tokens - 1, 0)
    return [prompt_len + k * residual_length for k in range(steps // residual_length + 1)]


def check_quantizable(
    spec: BackendSpec,
    settings: QuantSettings,
    *,
    batch: int,
    kv_heads: int,
    head_dim: int,
    prompt_len: int,
    new_tokens: int,
) -> None:
    """Raise GroupSizeError/UnsupportedCombination if a run would fail inside the backend:
    the kind says what q_group_size must divide (``grouped``), what it cannot pack
    (``packing_problem``) and what cannot work at all (``broken``)."""
    if not spec.group_wise:
        return
    G = settings.q_group_size
    if spec.broken:
        raise UnsupportedCombination(spec.broken)
    lengths = quantized_lengths(prompt_len, new_tokens, settings.residual_length)
    for seq in lengths:
        numel = batch * kv_heads * seq * head_dim
        per_group_dim, what = spec.kind.grouped(spec, numel, batch, head_dim)
        if per_group_dim % G:
            raise GroupSizeError(
                f"{spec.name}: q_group_size {G} does not divide {what} = {per_group_dim} "
                f"(batch {batch}, kv heads {kv_heads}, sequence {seq}, head_dim {head_dim}); "
                f"the cache quantizes at lengths {lengths}. "
                f"Pad the prompt to a length that makes it divisible or pick a q_group_size dividing it."
            )
        problem = spec.kind.packing_problem(spec, numel // G, seq)
        if problem:
            raise GroupSizeError(f"{spec.name}: {problem}")


def quantize_once(spec: BackendSpec, settings: QuantSettings, tensor: torch.Tensor):
    """Quantize ``tensor`` exactly as a cache layer does at prefill, and dequantize it
    back the way the layer does at the next step. Returns ``(qstate, restored)``.

    This is transformers' own code path (layer ``update`` then ``_dequantize``), so a
    change in how transformers drives quanto/hqq shows up in the quantizer tests.
    """
    if not spec.quantized:
        raise ValueError("the unquantized backend has nothing to quantize")
    layer = spec.kind.layer_class()(**spec.kind.cache_kwargs(spec, settings))
    layer.update(tensor, tensor.clone())
    qstate = layer._quantized_keys
    return qstate, layer._dequantize(qstate)
