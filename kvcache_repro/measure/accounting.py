"""Exact bytes a KV cache holds (every layer's stored tensors; a quantized one as its kind
counts it, kinds/*.py ``stored_bytes``), and the analytic model they must equal: from the
cache geometry and the tokens in quantized and residual storage (the kind's
``predicted_bytes`` gives its packing and metadata)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache_repro.backends import caches
from kvcache_repro.backends.kinds import KINDS
from kvcache_repro.backends.kinds.base import ZERO, CacheBytes, plain_tensors, tensor_bytes
from kvcache_repro.backends.matrix import BackendSpec


def _quantized_bytes(backend: str, qstate) -> CacheBytes:
    if qstate is None:
        return ZERO
    if type(qstate) is torch.Tensor:  # not quantized: "other", so the comparison fails with numbers
        return CacheBytes(0, 0, 0, tensor_bytes(qstate))
    return KINDS[backend].stored_bytes(qstate)


def describe(cache) -> str:
    """What the first layer holds where quantized storage belongs, in words (a failed byte
    comparison shows it)."""
    for i, layer in enumerate(caches.cache_layers(cache)):
        storage = caches.layer_storage(layer)
        q = storage.quantized_keys
        if q is None:
            continue
        if type(q) is torch.Tensor:
            return f"layer {i} keys: a dense {q.dtype} tensor {tuple(q.shape)} where packed codes belong " \
                   "(not quantized)"
        return f"layer {i} keys: {KINDS[storage.backend].describe(q)}"
    return "no quantized storage in any layer"


def _reachable_tensors(obj, seen: set[int]) -> list[torch.Tensor]:
    """Plain tensors reachable from an attribute value, each storage counted once."""
    if isinstance(obj, torch.Tensor):
        out = []
        for t in plain_tensors(obj):
            key = t.untyped_storage().data_ptr() if t.numel() else id(t)
            if key not in seen:
                seen.add(key)
                out.append(t)
        return out
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _reachable_tensors(item, seen)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _reachable_tensors(item, seen)]
    return []


def layer_bytes(layer) -> CacheBytes:
    """Known storage by kind, plus ``other``: every further tensor reachable from the
    layer's attributes (where an extra copy would land)."""
    storage = caches.layer_storage(layer)
    residual = sum(tensor_bytes(t) for t in (storage.residual_keys, storage.residual_values) if t is not None)
    known = (_quantized_bytes(storage.backend, storage.quantized_keys)
             + _quantized_bytes(storage.backend, storage.quantized_values)
             + CacheBytes(0, 0, residual))
    everything = sum(t.numel() * t.element_size() for t in _reachable_tensors(vars(layer), set()))
    return known + CacheBytes(0, 0, 0, everything - known.total)


def cache_bytes(cache) -> CacheBytes:
    """Bytes the cache really holds, summed over layers, keys and values."""
    return sum((layer_bytes(layer) for layer in caches.cache_layers(cache)), ZERO)


# ---- the analytic model ----------------------------------------------------------------

@dataclass(frozen=True)
class CacheGeometry:
    layers: int
    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def elements(self, tokens: int) -> int:
        """Elements of ONE key (or value) tensor of one layer."""
        return self.batch * self.kv_heads * tokens * self.head_dim


def token_split(spec: BackendSpec, settings: caches.QuantSettings, prompt_len: int,
                total_tokens: int) -> tuple[int, int]:
    """(quantized, residual) tokens per layer after ``total_tokens`` went into the cache."""
    if not spec.quantized:
        return 0, total_tokens
    if not spec.group_wise:
        return total_tokens, 0
    decoded = total_tokens - prompt_len
    flushed = (decoded // settings.residual_length) * settings.residual_length
    return prompt_len + flushed, decoded - flushed


def predict_cache_bytes(spec: BackendSpec, settings: caches.QuantSettings, geometry: CacheGeometry, *,
                        prompt_len: int, total_tokens: int) -> CacheBytes:
    """What the cache must hold after ``total_tokens`` (prompt + fed-back tokens)."""
    quantized_tokens, residual_tokens = token_split(spec, settings, prompt_len, total_tokens)
    per_tensor_residual = geometry.elements(residual_tokens) * geometry.itemsize
    n = geometry.elements(quantized_tokens)
    packed, meta = (0, 0) if n == 0 else spec.kind.predicted_bytes(spec, n, settings.q_group_size, geometry.itemsize)
    tensors = 2 * geometry.layers  # keys and values
    return CacheBytes(tensors * packed, tensors * meta, tensors * per_tensor_residual)
