"""Fault injection, to show the suite catches what it claims to catch.

Used as a pytest plugin: ``KVQ_FAULT=<name> pytest -p kvcache_repro.faults ...``. Each fault
patches transformers (its quantized cache layers, its plain cache, Llama's attention) the way
a regression could, or the machine (``oom``, ``hang``: for the experiment's robustness). Each
is declared once, by ``@fault(name, description)`` on the function that applies it:
``REGISTRY`` holds them in declaration order, ``FAULTS`` their names; ``python -m
kvcache_repro.faults`` lists them. An unknown name is refused, naming the valid ones.

A worker process (worker.py) applies ``KVQ_FAULT`` too (``in_worker``), so the experiment's
subprocesses see the same fault as the test process. docs/faults.md lists which tests fail
under each (tests/test_faults.py keeps its faults the registry's).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

ENV = "KVQ_FAULT"
OOM_BATCH_ENV = "KVQ_FAULT_OOM_BATCH"
# plain_cache_window: how many of the newest tokens keep their values.
WINDOW = 32


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


def _layers():
    """quanto's and hqq's quantized cache layers, and their methods as found (the originals)."""
    from transformers import cache_utils as cu
    quanto, hqq = cu.QuantoQuantizedLayer, cu.HQQQuantizedLayer
    return quanto, hqq, quanto._quantize, hqq._quantize, quanto._dequantize, hqq._dequantize


# ---- faults of the library --------------------------------------------------------------

@fault("full_precision", 'the layer "quantizes" by keeping the full-precision tensor')
def _full_precision() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()
    for cls in (quanto, hqq):
        cls._quantize = lambda self, tensor, axis: tensor.clone()
        cls._dequantize = lambda self, q: q


@fault("extra_copy", "the layer keeps a full-precision copy of what it quantized")
def _extra_copy() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def keep(original):
        def _quantize(self, tensor, axis):
            self._shadow = getattr(self, "_shadow", []) + [tensor.clone()]
            return original(self, tensor, axis)
        return _quantize
    quanto._quantize, hqq._quantize = keep(q_quantize), keep(h_quantize)


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
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def quanto_more(self, tensor, axis):
        self.qtype = qint4
        return q_quantize(self, tensor, axis)

    def hqq_more(self, tensor, axis):
        self.nbits = 8
        return h_quantize(self, tensor, axis)
    quanto._quantize, hqq._quantize = quanto_more, hqq_more


def _noisy(original, level):
    import torch
    def _dequantize(self, q):
        x = original(self, q)
        g = torch.Generator(device=x.device).manual_seed(0)
        return x + level * x.float().std() * torch.randn(x.shape, generator=g, device=x.device).to(x.dtype)
    return _dequantize


@fault("noise", "dequantized values get 3% Gaussian noise (of each tensor's std)")
def _noise() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()
    quanto._dequantize, hqq._dequantize = _noisy(q_deq, 0.03), _noisy(h_deq, 0.03)


@fault("low_precision_scales", "scales are computed in float16/bfloat16, not the model dtype")
def _low_precision_scales() -> None:
    import torch
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def low_quanto(self, tensor, axis):
        q = q_quantize(self, tensor, axis)
        q._scale.copy_(q._scale.to(torch.bfloat16).to(q._scale.dtype))
        return q

    def low_hqq(self, tensor, axis):
        codes, meta = h_quantize(self, tensor, axis)
        meta["scale"] = meta["scale"].to(torch.bfloat16).to(meta["scale"].dtype)
        return codes, meta
    quanto._quantize, hqq._quantize = low_quanto, low_hqq


@fault("double_dequantize", "every dequantize is done twice (same values, twice the cost)")
def _double_dequantize() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def twice(original):
        def _dequantize(self, q):
            original(self, q)
            return original(self, q)
        return _dequantize
    quanto._dequantize, hqq._dequantize = twice(q_deq), twice(h_deq)


@fault("quanto_slow_as_hqq", "quanto also runs hqq's optimizer at each quantize (hqq's cost, quanto's codes)")
def _quanto_slow_as_hqq() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def quanto_with_hqq_cost(self, tensor, axis):
        if not hasattr(self, "_hqq_twin"):
            self._hqq_twin = hqq.__new__(hqq)
            self._hqq_twin.__dict__.update(self.__dict__)
            from hqq.core.quantize import Quantizer
            self._hqq_twin.quantizer = Quantizer
        h_quantize(self._hqq_twin, tensor, axis)  # result dropped: cost only
        return q_quantize(self, tensor, axis)
    quanto._quantize = quanto_with_hqq_cost


@fault("keep_dequantized", "the layer keeps its last dequantized copy alive between steps")
def _keep_dequantized() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def kept(original):
        def _dequantize(self, q):
            self._last_dequantized = original(self, q)
            return self._last_dequantized
        return _dequantize
    quanto._dequantize, hqq._dequantize = kept(q_deq), kept(h_deq)


@fault("hqq_more_temporaries", "hqq's quantize holds two extra float32 copies of its input while it runs "
       "(its requantization temporaries, about doubled)")
def _hqq_more_temporaries() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def hqq_with_temporaries(self, tensor, axis):
        held = [tensor.float().clone() for _ in range(2)]
        out = h_quantize(self, tensor, axis)
        del held
        return out
    hqq._quantize = hqq_with_temporaries


@fault("hqq_noise", "hqq's dequantized values (only hqq's) get 30% Gaussian noise: hqq regresses in accuracy, "
       "quanto does not")
def _hqq_noise() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()
    hqq._dequantize = _noisy(h_deq, 0.30)


@fault("quanto_noise", "quanto's dequantized values (only quanto's) get 30% Gaussian noise: quanto regresses in "
       "accuracy, hqq does not (hqq_noise's mirror)")
def _quanto_noise() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()
    quanto._dequantize = _noisy(q_deq, 0.30)


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
    from transformers import cache_utils as cu
    plain_update = cu.DynamicLayer.update

    def update_with_copies(self, *args, **kwargs):
        out = plain_update(self, *args, **kwargs)
        if type(self) is cu.DynamicLayer:  # the quantized layers subclass it
            self._copies = [t.clone() for t in (self.keys, self.values) for _ in range(6)]
        return out
    cu.DynamicLayer.update = update_with_copies


@fault("plain_cache_window", f"the unquantized cache (DynamicLayer only) hands attention zeros for the values of "
       f"all but its last {WINDOW} tokens: the reference loses context, as a sliding-window regression of the "
       "plain cache would, and every quantized cache \"beats\" it")
def _plain_cache_window() -> None:
    from transformers import cache_utils as cu
    plain = cu.DynamicLayer.update

    def update_windowed(self, *args, **kwargs):
        keys, values = plain(self, *args, **kwargs)
        if type(self) is cu.DynamicLayer and values.shape[-2] > WINDOW:  # not the quantized subclasses
            values = values.clone()
            values[..., :-WINDOW, :] = 0  # shapes kept: the attention mask still fits
        return keys, values
    cu.DynamicLayer.update = update_windowed


@fault("hqq3_nan_after_flush", "hqq's 3-bit dequantize returns NaN once the layer has re-quantized after the "
       "prompt (its first flush): one backend's logits stop being finite, as fp8's did on torch 2.11")
def _hqq3_nan_after_flush() -> None:
    import torch
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def counting(self, tensor, axis):
        self._quantizations = getattr(self, "_quantizations", 0) + 1  # keys and values: 2 per flush
        return h_quantize(self, tensor, axis)

    def nan_after_flush(self, q):
        x = h_deq(self, q)
        flushed = self._quantizations > 2  # the prompt's keys and values were the first two
        return torch.full_like(x, float("nan")) if self.nbits == 3 and flushed else x
    hqq._quantize, hqq._dequantize = counting, nan_after_flush


@fault("stop_flushing_after_512", "once a layer holds 512 quantized tokens it stops flushing (its residual then "
       "grows in full precision): what only a run past 512 tokens shows")
def _stop_flushing_after_512() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def stops(original):
        def _quantize(self, tensor, axis):
            if tensor.shape[-2] >= 512:
                self.residual_length = 10**9  # from now on the residual only grows
            return original(self, tensor, axis)
        return _quantize
    quanto._quantize, hqq._quantize = stops(q_quantize), stops(h_quantize)


@fault("dequantize_via_float32", "every dequantize builds its copy in float32 and casts it back (values "
       "unchanged within an ulp of half precision; the transient doubles at fp16/bf16)")
def _dequantize_via_float32() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def via_float32(original):
        def _dequantize(self, q):
            x = original(self, q)
            wide = x.float()  # the copy built in float32, alive while it is cast back
            return wide.to(x.dtype)
        return _dequantize
    quanto._dequantize, hqq._dequantize = via_float32(q_deq), via_float32(h_deq)


@fault("dequantize_half_again", "every other dequantize is done twice (same values, 1.5x its cost)")
def _dequantize_half_again() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def half_again(original):
        calls = [0]

        def _dequantize(self, q):
            calls[0] += 1
            if calls[0] % 2:
                original(self, q)  # result dropped: cost only
            return original(self, q)
        return _dequantize
    quanto._dequantize, hqq._dequantize = half_again(q_deq), half_again(h_deq)


@fault("dense_at_large_batch", "from batch 64 up the quantized layers keep K/V unquantized (quanto: the tensor "
       "itself; hqq: the tensor with empty metadata)")
def _dense_at_large_batch() -> None:
    import torch
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()

    def dense_quanto(self, tensor, axis):
        return tensor.clone() if tensor.shape[0] >= 64 else q_quantize(self, tensor, axis)

    def dense_hqq(self, tensor, axis):
        return (tensor.clone(), {}) if tensor.shape[0] >= 64 else h_quantize(self, tensor, axis)

    def plain_quanto(self, q):
        return q if type(q) is torch.Tensor else q_deq(self, q)

    def plain_hqq(self, q):
        return q[0] if not q[1] else h_deq(self, q)
    quanto._quantize, hqq._quantize = dense_quanto, dense_hqq
    quanto._dequantize, hqq._dequantize = plain_quanto, plain_hqq


@fault("quanto_axis_ignored", "quanto quantizes along axis -1 whatever axis was asked")
def _quanto_axis_ignored() -> None:
    quanto, hqq, q_quantize, h_quantize, q_deq, h_deq = _layers()
    quanto._quantize = lambda self, tensor, axis: q_quantize(self, tensor, -1)


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
