"""Exact bytes a KV cache holds, and the analytic model they must equal.

Measured: walk every layer and add the bytes of the tensors really stored. quanto's
``WeightQBitsTensor`` reports the DENSE size from ``.nbytes`` and its storage, so it is
flattened (``__tensor_flatten__``) down to plain tensors (packed uint8 data, scale,
shift). hqq keeps ``(W_q, meta)``; only ``meta['scale']`` and ``meta['zero']`` are tensors.

Predicted: from the cache geometry, the token counts in quantized and residual storage,
the backend's packing, and one scale + one zero-point per group in the model dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcache_repro.backends import caches
from kvcache_repro.backends.matrix import BackendSpec


@dataclass(frozen=True)
class CacheBytes:
    packed: int  # quantized codes
    metadata: int  # scales, zero-points/shifts
    residual: int  # full-precision tensors (all of DynamicCache)
    other: int = 0  # any other tensor the layer holds: none is expected

    @property
    def total(self) -> int:
        return self.packed + self.metadata + self.residual + self.other

    def __add__(self, other: "CacheBytes") -> "CacheBytes":
        return CacheBytes(self.packed + other.packed, self.metadata + other.metadata,
                          self.residual + other.residual, self.other + other.other)


ZERO = CacheBytes(0, 0, 0)


def plain_tensors(obj) -> list[torch.Tensor]:
    """The plain tensors behind a tensor subclass (recursively), or the tensor itself."""
    if isinstance(obj, torch.Tensor) and type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return [t for name in names for t in plain_tensors(getattr(obj, name))]
    if isinstance(obj, torch.Tensor):
        return [obj]
    raise TypeError(f"not a tensor: {type(obj).__name__}")


def tensor_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in plain_tensors(obj))


def _quantized_bytes(backend: str, qstate) -> CacheBytes:
    if qstate is None:
        return ZERO
    if type(qstate) is torch.Tensor:
        # a plain tensor where packed codes belong: the layer did not quantize. Counted
        # as "other", so the byte comparison fails with the numbers instead of a crash.
        return CacheBytes(0, 0, 0, tensor_bytes(qstate))
    if backend == "quanto":
        names, _ = qstate.__tensor_flatten__()
        data = sum(tensor_bytes(getattr(qstate, n)) for n in names if n == "_data")
        meta = sum(tensor_bytes(getattr(qstate, n)) for n in names if n != "_data")
        return CacheBytes(data, meta, 0)
    if backend == "hqq":
        codes, meta = qstate
        if not isinstance(meta, dict) or "scale" not in meta or "zero" not in meta:
            # values without their scales and zeros (not quantized): "other", so the byte
            # comparison fails naming what the layer holds (describe) instead of a KeyError
            return CacheBytes(0, 0, 0, tensor_bytes(codes))
        return CacheBytes(tensor_bytes(codes), tensor_bytes(meta["scale"]) + tensor_bytes(meta["zero"]), 0)
    if backend == "fp8":
        codes, scale = qstate
        return CacheBytes(tensor_bytes(codes), tensor_bytes(scale), 0)
    raise ValueError(f"unknown backend {backend!r}")


def describe(cache) -> str:
    """What the first layer holds where quantized storage belongs, in words: the line a
    failed byte comparison shows, so a cache that stores dense values reads as such."""
    for i, layer in enumerate(caches.cache_layers(cache)):
        storage = caches.layer_storage(layer)
        q = storage.quantized_keys
        if storage.backend in ("none", None) or q is None:
            continue
        if type(q) is torch.Tensor:
            return f"layer {i} keys: a dense {q.dtype} tensor {tuple(q.shape)} where packed codes belong (not quantized)"
        if storage.backend == "hqq":
            codes, meta = q
            if not isinstance(meta, dict) or "scale" not in meta:
                return (f"layer {i} keys: a {codes.dtype} tensor {tuple(codes.shape)} without scales or zeros "
                        f"(not quantized)")
            return f"layer {i} keys: hqq codes {codes.dtype} {tuple(codes.shape)}, axis {meta.get('axis')}"
        if storage.backend == "quanto":
            return f"layer {i} keys: {type(q).__name__} {tuple(q.shape)}, axis {getattr(q, 'axis', '?')}"
        return f"layer {i} keys: {type(q).__name__}"
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
    layer's attributes (an extra copy a release might keep would land there)."""
    storage = caches.layer_storage(layer)
    residual = sum(tensor_bytes(t) for t in (storage.residual_keys, storage.residual_values) if t is not None)
    known = (_quantized_bytes(storage.backend, storage.quantized_keys)
             + _quantized_bytes(storage.backend, storage.quantized_values)
             + CacheBytes(0, 0, residual))
    everything = sum(t.numel() * t.element_size() for t in _reachable_tensors(vars(layer), set()))
    return known + CacheBytes(0, 0, 0, everything - known.total)


def cache_bytes(cache) -> CacheBytes:
    """Bytes the cache really holds, summed over layers, keys and values."""
    total = ZERO
    for layer in caches.cache_layers(cache):
        total = total + layer_bytes(layer)
    return total


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


def token_split(spec: BackendSpec, settings: caches.QuantSettings, prompt_len: int, total_tokens: int) -> tuple[int, int]:
    """(quantized, residual) tokens per layer after ``total_tokens`` went into the cache."""
    if not spec.quantized:
        return 0, total_tokens
    if not spec.group_wise:
        return total_tokens, 0
    decoded = total_tokens - prompt_len
    flushed = (decoded // settings.residual_length) * settings.residual_length
    return prompt_len + flushed, decoded - flushed


def _packed_bytes(spec: BackendSpec, n: int, group: int) -> int:
    """Bytes of packed codes for n values. hqq 3-bit stores 10 codes per int32 and pads the
    packed dimension to a multiple of 10: G rows (axis 0) or n/G rows (axis 1)."""
    if spec.backend == "hqq" and spec.nbits == 3:
        groups = n // group
        if spec.axis == 0:
            return 4 * math.ceil(group / 10) * groups
        return 4 * math.ceil(groups / 10) * group
    return n * spec.nbits // 8


def predict_cache_bytes(
    spec: BackendSpec,
    settings: caches.QuantSettings,
    geometry: CacheGeometry,
    *,
    prompt_len: int,
    total_tokens: int,
) -> CacheBytes:
    """What the cache must hold after ``total_tokens`` (prompt + fed-back tokens)."""
    quantized_tokens, residual_tokens = token_split(spec, settings, prompt_len, total_tokens)
    per_tensor_residual = geometry.elements(residual_tokens) * geometry.itemsize
    n = geometry.elements(quantized_tokens)
    if not spec.quantized or n == 0:
        packed = meta = 0
    elif spec.backend == "fp8":
        packed, meta = n, 4  # float8 codes + one float32 scale per tensor
    else:
        G = settings.q_group_size
        packed = _packed_bytes(spec, n, G)
        meta = 2 * (n // G) * geometry.itemsize  # scale + zero-point per group, model dtype
    tensors = 2 * geometry.layers  # keys and values
    return CacheBytes(tensors * packed, tensors * meta, tensors * per_tensor_residual)
