"""Fault injection, to show the suite catches what it claims to catch.

A pytest plugin: ``KVQ_FAULT=<name> pytest -p kvcache_repro.faults ...``. Each fault patches
transformers (its quantized cache layers, its plain cache, Llama's attention) as a regression
could, or the machine (``oom``, ``hang``: for the experiment's robustness), and is declared
once, by ``fault(name, description)`` on the function that applies it (``python -m
kvcache_repro.faults`` lists them). Workers apply ``KVQ_FAULT`` too (``in_worker``).
docs/faults.md lists which tests fail under each.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

ENV = "KVQ_FAULT"
OOM_BATCH_ENV = "KVQ_FAULT_OOM_BATCH"
WINDOW = 32  # plain_cache_window: how many of the newest tokens keep their values


@dataclass(frozen=True)
class Fault:
    name: str
    description: str  # one paragraph: what the patch does, as a regression would
    apply: Callable[[], None]  # patches, in this process, for the rest of its life
    machine: bool = False  # a fault of the machine (oom, hang), not of the library


REGISTRY: dict[str, Fault] = {}


def fault(name: str, description: str, *, machine: bool = False):
    """Registers the decorated function as the fault ``name`` (its patch); returns it unchanged."""
    def register(apply: Callable[[], None]) -> Callable[[], None]:
        if name in REGISTRY:
            raise ValueError(f"fault {name!r} declared twice")
        REGISTRY[name] = Fault(name, " ".join(description.split()), apply, machine)
        return apply
    return register


def _wrap(method: str, make: Callable, *layers: str) -> None:
    """Sets ``method`` of the quantized layers named (default: quanto's and hqq's) to
    ``make(the method as found)``."""
    from transformers import cache_utils as cu
    for name in layers or ("quanto", "hqq"):
        cls = cu.QuantoQuantizedLayer if name == "quanto" else cu.HQQQuantizedLayer
        setattr(cls, method, make(getattr(cls, method)))


def _before_quantize(hook: Callable, *layers: str) -> None:
    """Each quantize of the layers named first calls ``hook(layer, tensor, axis)``."""
    def make(original):
        def _quantize(self, tensor, axis):
            hook(self, tensor, axis)
            return original(self, tensor, axis)
        return _quantize
    _wrap("_quantize", make, *layers)


def _after_dequantize(change: Callable, *layers: str) -> None:
    """Each dequantize of the layers named returns ``change(layer, what it returned)``."""
    def make(original):
        def _dequantize(self, q):
            return change(self, original(self, q))
        return _dequantize
    _wrap("_dequantize", make, *layers)


def _after_plain_update(change: Callable) -> None:
    """The plain cache's update (DynamicLayer's, not its quantized subclasses') returns
    ``change(layer, keys, values)`` of what it returned."""
    from transformers import cache_utils as cu
    update = cu.DynamicLayer.update

    def changed(self, *args, **kwargs):
        out = update(self, *args, **kwargs)
        return change(self, *out) if type(self) is cu.DynamicLayer else out
    cu.DynamicLayer.update = changed


# ---- faults of the library --------------------------------------------------------------

@fault("full_precision", 'the layer "quantizes" by keeping the full-precision tensor')
def _full_precision() -> None:
    _wrap("_quantize", lambda original: lambda self, tensor, axis: tensor.clone())
    _wrap("_dequantize", lambda original: lambda self, q: q)


@fault("extra_copy", "the layer keeps a full-precision copy of what it quantized")
def _extra_copy() -> None:
    def keep(self, tensor, axis):
        self._shadow = getattr(self, "_shadow", []) + [tensor.clone()]
    _before_quantize(keep)


@fault("ignore_residual", "the residual is never flushed (residual_length ignored)")
def _ignore_residual() -> None:
    from transformers import cache_utils as cu
    original_init = cu.QuantizedLayer.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.residual_length = 10**9
    cu.QuantizedLayer.__init__ = __init__


@fault("more_bits", "more bits are used than asked (quanto 2 -> 4, hqq n -> 8)")
def _more_bits() -> None:
    from optimum.quanto import qint4
    _before_quantize(lambda self, tensor, axis: setattr(self, "qtype", qint4), "quanto")
    _before_quantize(lambda self, tensor, axis: setattr(self, "nbits", 8), "hqq")


def _noise_of(level: float, *layers: str) -> None:
    """Dequantized values of the layers named get ``level`` x their std of seeded Gaussian noise."""
    import torch

    def noisy(self, x):
        g = torch.Generator(device=x.device).manual_seed(0)
        return x + level * x.float().std() * torch.randn(x.shape, generator=g, device=x.device).to(x.dtype)
    _after_dequantize(noisy, *layers)


fault("noise", "dequantized values get 3% Gaussian noise (of each tensor's std)")(lambda: _noise_of(0.03))


def _scales(change, when=lambda layer, tensor: True) -> None:
    """Each quantize of quanto's and hqq's layers stores ``change(scale)`` for its scales, where ``when(layer, tensor)``."""
    def quanto(original):
        def _quantize(self, tensor, axis):
            q = original(self, tensor, axis)
            if when(self, tensor):
                q._scale.copy_(change(q._scale))
            return q
        return _quantize

    def hqq(original):
        def _quantize(self, tensor, axis):
            codes, meta = original(self, tensor, axis)
            if when(self, tensor):
                meta["scale"] = change(meta["scale"])
            return codes, meta
        return _quantize
    _wrap("_quantize", quanto, "quanto")
    _wrap("_quantize", hqq, "hqq")


@fault("low_precision_scales", "scales are computed in float16/bfloat16, not the model dtype")
def _low_precision_scales() -> None:
    import torch
    _scales(lambda scale: scale.to(torch.bfloat16).to(scale.dtype))


def _coarse_mantissa(x, bits: int = 3):  # ``x`` with ``bits`` bits of mantissa (relative error <= 2^-(bits+1))
    import torch
    m, e = torch.frexp(x.float())
    return torch.ldexp(torch.round(m * 2**bits) / 2**bits, e).to(x.dtype)


@fault("half_precision_scales", "once a float16/bfloat16 cache re-quantizes (its first flush on), its scales are "
       "kept with 3 bits of mantissa (float32 and the prompt's quantize untouched, bytes unchanged): accuracy lost "
       "only in half precision, where the quantizer tests (prompt quantize, next-step dequantize) do not look")
def _half_precision_scales() -> None:
    import torch

    def flushed_half(layer, tensor):
        layer._quantizations = getattr(layer, "_quantizations", 0) + 1  # keys and values: 2 per quantize
        return layer._quantizations > 2 and tensor.dtype in (torch.float16, torch.bfloat16)
    _scales(_coarse_mantissa, when=flushed_half)


@fault("degrade_past_512", "once a layer's store holds 512 tokens, its dequantized values are snapped in place to "
       "16 levels over the whole tensor (bytes unchanged): accuracy lost only past a few hundred quantized tokens")
def _degrade_past_512() -> None:
    def snapped(self, x):
        if x.shape[-2] >= 512:
            lo, step = x.min(), (x.max() - x.min()) / 15
            x.sub_(lo).div_(step).round_().mul_(step).add_(lo)
        return x
    _after_dequantize(snapped)


def _dequantize_again(every: int, extra: int = 1) -> None:
    """Every ``every``-th dequantize (the first, then each ``every`` more) runs ``extra`` more
    times first, their results dropped: cost only."""
    def make(original):
        calls = [0]

        def _dequantize(self, q):
            calls[0] += 1
            if (calls[0] - 1) % every == 0:
                for _ in range(extra):
                    original(self, q)
            return original(self, q)
        return _dequantize
    _wrap("_dequantize", make)


fault("double_dequantize", "every dequantize is done twice (same values, twice the cost)")(
    lambda: _dequantize_again(1))
fault("dequantize_thrice", "every dequantize is done three times (same values, three times the cost): a gross "
      "slowdown")(lambda: _dequantize_again(1, extra=2))


@fault("quanto_slow_as_hqq", "quanto also runs hqq's optimizer at each quantize (hqq's cost, quanto's codes)")
def _quanto_slow_as_hqq() -> None:
    from transformers import cache_utils as cu
    hqq = cu.HQQQuantizedLayer
    h_quantize = hqq._quantize

    def hqq_cost(self, tensor, axis):
        if not hasattr(self, "_hqq_twin"):
            self._hqq_twin = hqq.__new__(hqq)
            self._hqq_twin.__dict__.update(self.__dict__)
            from hqq.core.quantize import Quantizer
            self._hqq_twin.quantizer = Quantizer
        h_quantize(self._hqq_twin, tensor, axis)  # result dropped: cost only
    _before_quantize(hqq_cost, "quanto")


@fault("keep_dequantized", "the layer keeps its last dequantized copy alive between steps")
def _keep_dequantized() -> None:
    def kept(self, x):
        self._last_dequantized = x
        return x
    _after_dequantize(kept)


@fault("hqq_more_temporaries", "hqq's quantize holds two extra float32 copies of its input while it runs "
       "(its requantization temporaries, about doubled)")
def _hqq_more_temporaries() -> None:
    def with_temporaries(original):
        def _quantize(self, tensor, axis):
            held = [tensor.float().clone() for _ in range(2)]
            out = original(self, tensor, axis)
            del held
            return out
        return _quantize
    _wrap("_quantize", with_temporaries, "hqq")


fault("hqq_noise", "hqq's dequantized values (only hqq's) get 30% Gaussian noise: hqq regresses in accuracy, "
      "quanto does not")(lambda: _noise_of(0.30, "hqq"))
fault("quanto_noise", "quanto's dequantized values (only quanto's) get 30% Gaussian noise: quanto regresses in "
      "accuracy, hqq does not (hqq_noise's mirror)")(lambda: _noise_of(0.30, "quanto"))


@fault("attention_scale_drift", "every Llama attention's softmax scale is 10% too large: a regression of the "
       "model itself, every cache (the unquantized reference too) alike")
def _attention_scale_drift() -> None:
    from transformers.models.llama import modeling_llama
    llama_init = modeling_llama.LlamaAttention.__init__

    def drifted_init(self, *args, **kwargs):
        llama_init(self, *args, **kwargs)
        self.scaling *= 1.1
    modeling_llama.LlamaAttention.__init__ = drifted_init


@fault("unquantized_copies", "the unquantized cache (DynamicLayer, not the quantized layers) keeps six extra "
       "copies of its keys and values, made anew at every step: a memory and speed regression of the baseline "
       "that makes quantization look better than it is")
def _unquantized_copies() -> None:
    def with_copies(self, keys, values):
        self._copies = [t.clone() for t in (self.keys, self.values) for _ in range(6)]
        return keys, values
    _after_plain_update(with_copies)


@fault("plain_cache_window", f"the unquantized cache (DynamicLayer only) hands attention zeros for the values of "
       f"all but its last {WINDOW} tokens: the reference loses context, as a sliding-window regression of the "
       "plain cache would, and every quantized cache \"beats\" it")
def _plain_cache_window() -> None:
    def windowed(self, keys, values):
        if values.shape[-2] > WINDOW:
            values = values.clone()
            values[..., :-WINDOW, :] = 0  # shapes kept: the attention mask still fits
        return keys, values
    _after_plain_update(windowed)


@fault("hqq3_nan_after_flush", "hqq's 3-bit dequantize returns NaN once the layer has re-quantized after the "
       "prompt (its first flush): one backend's logits stop being finite, as fp8's did on torch 2.11")
def _hqq3_nan_after_flush() -> None:
    import torch

    def counting(self, tensor, axis):
        self._quantizations = getattr(self, "_quantizations", 0) + 1  # keys and values: 2 per flush

    def nan_after_flush(self, x):
        flushed = self._quantizations > 2  # the prompt's keys and values were the first two
        return torch.full_like(x, float("nan")) if self.nbits == 3 and flushed else x
    _before_quantize(counting, "hqq")
    _after_dequantize(nan_after_flush, "hqq")


@fault("stop_flushing_after_512", "once a layer holds 512 quantized tokens it stops flushing (its residual then "
       "grows in full precision): what only a run past 512 tokens shows")
def _stop_flushing_after_512() -> None:
    def stops(self, tensor, axis):
        if tensor.shape[-2] >= 512:
            self.residual_length = 10**9  # from now on the residual only grows
    _before_quantize(stops)


# dequantize_via_float32: the float32 copy is alive while it is cast back
fault("dequantize_via_float32", "every dequantize builds its copy in float32 and casts it back (values "
      "unchanged within an ulp of half precision; the transient doubles at fp16/bf16)")(
    lambda: _after_dequantize(lambda self, x: x.float().to(x.dtype)))
fault("hqq_dequantize_via_float32", "hqq's dequantize builds its copy in float32 and casts it back (values unchanged "
      "within an ulp): a decode step's transient grows at fp16/bf16, hqq's requantization still sets the run's peak")(
    lambda: _after_dequantize(lambda self, x: x.float().to(x.dtype), "hqq"))
fault("dequantize_half_again", "every other dequantize is done twice (same values, 1.5x its cost)")(
    lambda: _dequantize_again(2))


@fault("dense_at_large_batch", "from batch 64 up the quantized layers keep K/V unquantized (quanto: the tensor "
       "itself; hqq: the tensor with empty metadata)")
def _dense_at_large_batch() -> None:
    import torch
    _wrap("_quantize", lambda quantize: lambda self, tensor, axis: (
        tensor.clone() if tensor.shape[0] >= 64 else quantize(self, tensor, axis)), "quanto")
    _wrap("_quantize", lambda quantize: lambda self, tensor, axis: (
        (tensor.clone(), {}) if tensor.shape[0] >= 64 else quantize(self, tensor, axis)), "hqq")
    _wrap("_dequantize", lambda dequantize: lambda self, q: (
        q if type(q) is torch.Tensor else dequantize(self, q)), "quanto")
    _wrap("_dequantize", lambda dequantize: lambda self, q: q[0] if not q[1] else dequantize(self, q), "hqq")


fault("quanto_axis_ignored", "quanto quantizes along axis -1 whatever axis was asked")(
    lambda: _wrap("_quantize", lambda original: lambda self, tensor, axis: original(self, tensor, -1), "quanto"))


# ---- faults of the machine, for the experiment's robustness -----------------------------

@fault("oom", f"``generate()`` raises torch's OutOfMemoryError for batches of at least ``{OOM_BATCH_ENV}`` "
       "(default 200): a device too small for the large batch", machine=True)
def _oom() -> None:
    import torch
    from transformers.generation.utils import GenerationMixin
    threshold = int(os.environ.get(OOM_BATCH_ENV, "200"))
    original = GenerationMixin.generate

    def generate(self, inputs=None, *args, **kwargs):
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is not None and ids.shape[0] >= threshold:
            raise torch.OutOfMemoryError(
                f"(KVQ_FAULT=oom) Tried to allocate 2.00 GiB: batch {ids.shape[0]} >= {threshold} does not fit")
        return original(self, inputs, *args, **kwargs)
    GenerationMixin.generate = generate


@fault("hang", "a worker stops answering right after it starts (sleeps forever, before importing torch, so a "
       "test of the time limit takes seconds); in_worker applies it, pytest_configure leaves it to the workers",
       machine=True)
def _hang() -> None:
    raise ValueError("KVQ_FAULT=hang applies to experiment workers (worker.py), not to the test process")


FAULTS = tuple(REGISTRY)


def _unknown(name: str) -> str:
    return f"unknown {ENV} {name!r}; valid: {', '.join(FAULTS)}"


def apply(name: str) -> None:
    """Applies the fault ``name`` in this process; ValueError for a name not in the registry."""
    if name not in REGISTRY:
        raise ValueError(_unknown(name))
    REGISTRY[name].apply()


def in_worker() -> None:
    """worker.py, before anything heavy: ``hang`` hangs here; others patch as in pytest."""
    name = os.environ.get(ENV)
    if name == "hang":
        print(f"worker {os.getpid()}: KVQ_FAULT=hang - not answering", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    if name:
        apply(name)


def pytest_configure(config):
    name = os.environ.get(ENV)
    if name and name not in REGISTRY:
        import pytest

        raise pytest.UsageError(_unknown(name))  # "ERROR: unknown KVQ_FAULT ...", exit status 4
    if name and name != "hang":  # hang is for the workers this process starts
        apply(name)


if __name__ == "__main__":
    for f in REGISTRY.values():
        print(f"{f.name}{' (machine)' if f.machine else ''}: {f.description}")
