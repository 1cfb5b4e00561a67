"""The only module that knows transformers' quantized-cache API.

Tests and experiments ask this module for a cache, for ``generate()`` keyword
arguments, or for the storage a cache layer holds; they never import
transformers' cache classes themselves. When a transformers release moves the API,
this file is the one to change.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from kvcache_repro.backends.matrix import BACKENDS, BackendSpec, QuantSettings  # noqa: F401  (QuantSettings re-exported)

# The seed's settings (FACTS.md): nbits 4, q_group_size 128, residual_length 64.
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
def transformers_major() -> int:
    return int(transformers.__version__.split(".")[0])


@functools.lru_cache(maxsize=None)
def available_backends() -> tuple[str, ...]:
    """Backend names this transformers can build with the installed quantizers (fp8
    exists from 5.21 on; a backend transformers refuses to build, refused_backends, is
    left out and named by tests/test_version_expectations.py)."""
    import transformers.cache_utils as cu

    refused = refused_backends()
    names = []
    for name, spec in BACKENDS.items():
        if spec.backend == "fp8" and not hasattr(cu, "Fp8QuantizedLayer"):
            continue
        if spec.backend in refused:
            continue
        names.append(name)
    return tuple(names)


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
    for spec in {s.backend: s for s in BACKENDS.values() if s.quantized and s.group_wise}.values():
        try:
            build_cache(spec, config, settings)
        except ImportError as error:
            out[spec.backend] = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return out


def _backend_kwargs(spec: BackendSpec, settings: QuantSettings) -> dict[str, Any]:
    if not spec.group_wise:
        return {}
    return {
        "nbits": spec.nbits,
        "axis_key": spec.axis,
        "axis_value": spec.axis,
        "q_group_size": settings.q_group_size,
        "residual_length": settings.residual_length,
    }


def cache_config(spec: BackendSpec, settings: QuantSettings) -> dict[str, Any]:
    """A new ``cache_config`` dict for ``generate()``. Always a fresh dict: some
    transformers releases pop keys out of the caller's dict (transformers #48700)."""
    if not spec.quantized:
        raise ValueError("the unquantized backend takes no cache_config")
    return {"backend": spec.backend, **_backend_kwargs(spec, settings)}


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
    if not spec.quantized:
        cache = DynamicCache(config=model_config)
    else:
        from transformers import QuantizedCache

        cache = QuantizedCache(spec.backend, model_config, **_backend_kwargs(spec, settings))
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
    """The tensors one cache layer holds, whatever its class."""
    from transformers import cache_utils as cu

    def residual(t):
        return t if isinstance(t, torch.Tensor) and t.numel() > 0 else None

    if isinstance(layer, cu.QuantoQuantizedLayer):
        backend = "quanto"
    elif isinstance(layer, cu.HQQQuantizedLayer):
        backend = "hqq"
    elif hasattr(cu, "Fp8QuantizedLayer") and isinstance(layer, cu.Fp8QuantizedLayer):
        # fp8 keeps ``keys``/``values`` only as empty placeholders; everything is quantized.
        return LayerStorage("fp8", layer._quantized_keys, layer._quantized_values, None, None)
    elif isinstance(layer, cu.DynamicLayer):  # after the quantized classes, which subclass it
        return LayerStorage("none", None, None, residual(layer.keys), residual(layer.values))
    else:
        raise TypeError(f"no storage model for cache layer {type(layer).__name__}")
    # getattr: 4.57 creates the quantized attributes only on the first update, and a
    # model that never calls update() (RecurrentGemma on 4.57) leaves them unset.
    return LayerStorage(
        backend,
        getattr(layer, "_quantized_keys", None),
        getattr(layer, "_quantized_values", None),
        residual(getattr(layer, "keys", None)),
        residual(getattr(layer, "values", None)),
    )


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
    """Raise GroupSizeError/UnsupportedCombination if a run would fail inside the backend.

    Rules, read from optimum-quanto 0.2.7 ``tensor/grouped.py`` and hqq 0.2.8
    ``core/quantize.py`` + ``core/bitpack.py``:
    - quanto axis 0: G divides H*S*D (one row per batch element); axis -1: G divides B*H*S.
    - hqq: G divides B*H*S*D. With axis 1 the grouped tensor has B*H*S*D/G rows, and the
      bit packer needs them to be a multiple of 8/nbits (else a shape error at dequantize).
    - hqq 3-bit with axis 1 cannot dequantize at all (hqq trims rows as for a 2-D weight).
    """
    if not spec.group_wise:
        return
    G = settings.q_group_size
    if spec.broken:
        raise UnsupportedCombination(spec.broken)
    for seq in quantized_lengths(prompt_len, new_tokens, settings.residual_length):
        numel = batch * kv_heads * seq * head_dim
        if spec.backend == "quanto":
            per_group_dim = numel // batch if spec.axis == 0 else numel // head_dim
            what = "H*S*D per batch row" if spec.axis == 0 else "B*H*S"
        else:
            per_group_dim, what = numel, "B*H*S*D"
        if per_group_dim % G:
            raise GroupSizeError(
                f"{spec.name}: q_group_size {G} does not divide {what} = {per_group_dim} "
                f"(batch {batch}, kv heads {kv_heads}, sequence {seq}, head_dim {head_dim}); "
                f"the cache quantizes at lengths {quantized_lengths(prompt_len, new_tokens, settings.residual_length)}. "
                f"Pad the prompt to a length that makes it divisible or pick a q_group_size dividing it."
            )
        if spec.backend == "hqq" and spec.axis == 1 and spec.nbits in (1, 2, 4):
            rows, per_byte = numel // G, 8 // spec.nbits
            if rows % per_byte:
                raise GroupSizeError(
                    f"{spec.name}: hqq packs {per_byte} groups per byte along axis 1 but the "
                    f"tensor at sequence {seq} has {rows} groups (B*H*S*D/G); "
                    f"choose a batch/prompt length making it a multiple of {per_byte}"
                )


def quantize_once(spec: BackendSpec, settings: QuantSettings, tensor: torch.Tensor):
    """Quantize ``tensor`` exactly as a cache layer does at prefill, and dequantize it
    back the way the layer does at the next step. Returns ``(qstate, restored)``.

    This is transformers' own code path (layer ``update`` then ``_dequantize``), so a
    change in how transformers drives quanto/hqq shows up in the quantizer tests.
    """
    if not spec.quantized:
        raise ValueError("the unquantized backend has nothing to quantize")
    from transformers import cache_utils as cu

    layer_class = {"quanto": cu.QuantoQuantizedLayer, "hqq": cu.HQQQuantizedLayer}.get(spec.backend)
    if layer_class is None:
        layer_class = cu.Fp8QuantizedLayer
        layer = layer_class()
    else:
        layer = layer_class(**{k: v for k, v in _backend_kwargs(spec, settings).items()})
    layer.update(tensor, tensor.clone())
    qstate = layer._quantized_keys
    return qstate, layer._dequantize(qstate)
