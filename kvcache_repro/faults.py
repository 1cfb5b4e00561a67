"""Fault injection, to show the suite catches what it claims to catch.

Used as a pytest plugin: ``KVQ_FAULT=<name> pytest -p kvcache_repro.faults ...``. Each
fault patches transformers' quantized cache layers the way a regression could:

- ``full_precision``: the layer "quantizes" by keeping the full-precision tensor
- ``extra_copy``: the layer keeps a full-precision copy of what it quantized
- ``ignore_residual``: the residual is never flushed (residual_length ignored)
- ``more_bits``: more bits are used than asked (quanto 2 -> 4, hqq n -> 8)
- ``noise``: dequantized values get 3% Gaussian noise (of each tensor's std)
- ``low_precision_scales``: scales are computed in float16/bfloat16, not the model dtype
- ``double_dequantize``: every dequantize is done twice (same values, twice the cost)
- ``keep_dequantized``: the layer keeps its last dequantized copy alive between steps
- ``hqq_more_temporaries``: hqq's quantize holds two extra float32 copies of its input
  while it runs (its requantization temporaries, about doubled)
- ``quanto_slow_as_hqq``: quanto also runs hqq's optimizer at each quantize (hqq's cost, quanto's codes)
- ``hqq_noise``: hqq's dequantized values (only hqq's) get 30% Gaussian noise: hqq
  regresses in accuracy, quanto does not
- ``quanto_noise``: quanto's dequantized values (only quanto's) get 30% Gaussian noise:
  quanto regresses in accuracy, hqq does not (hqq_noise's mirror)
- ``attention_scale_drift``: every Llama attention's softmax scale is 10% too large: a
  regression of the model itself, every cache (the unquantized reference too) alike
- ``unquantized_copies``: the unquantized cache (DynamicLayer, not the quantized layers)
  keeps six extra copies of its keys and values, made anew at every step: a memory and
  speed regression of the baseline that makes quantization look better than it is
- ``plain_cache_window``: the unquantized cache (DynamicLayer only) hands attention zeros
  for the values of all but its last 32 tokens: the reference loses context, as a
  sliding-window regression of the plain cache would, and every quantized cache "beats" it

- ``stop_flushing_after_512``: once a layer holds 512 quantized tokens it stops flushing
  (its residual then grows in full precision): what only a run past 512 tokens shows
- ``dequantize_via_float32``: every dequantize builds its copy in float32 and casts it
  back (values unchanged within an ulp of half precision; the transient doubles at fp16/bf16)
- ``dequantize_half_again``: every other dequantize is done twice (same values, 1.5x its cost)
- ``dense_at_large_batch``: from batch 64 up the quantized layers keep K/V unquantized
  (quanto: the tensor itself; hqq: the tensor with empty metadata)
- ``quanto_axis_ignored``: quanto quantizes along axis -1 whatever axis was asked

- ``hqq3_nan_after_flush``: hqq's 3-bit dequantize returns NaN once the layer has
  re-quantized after the prompt (its first flush): one backend's logits stop being finite,
  as fp8's did on torch 2.11

Faults of the machine rather than the library, for the experiment's robustness:

- ``oom``: ``generate()`` raises torch's OutOfMemoryError for batches of at least
  ``KVQ_FAULT_OOM_BATCH`` (default 200) - a device too small for the large batch
- ``hang``: a worker stops answering right after it starts (sleeps forever, before
  importing torch, so a test of the time limit takes seconds)

A worker process (worker.py) applies ``KVQ_FAULT`` too, so the experiment's
subprocesses see the same fault as the test process.

docs/faults.md lists which tests fail under each.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "KVQ_FAULT"
OOM_BATCH_ENV = "KVQ_FAULT_OOM_BATCH"
FAULTS = ("full_precision", "extra_copy", "ignore_residual", "more_bits", "noise", "low_precision_scales",
          "double_dequantize", "quanto_slow_as_hqq", "keep_dequantized", "hqq_more_temporaries", "hqq_noise",
          "quanto_noise", "attention_scale_drift", "unquantized_copies", "plain_cache_window", "hqq3_nan_after_flush", "stop_flushing_after_512",
          "dequantize_via_float32", "dequantize_half_again", "dense_at_large_batch", "quanto_axis_ignored", "oom", "hang")
# plain_cache_window: how many of the newest tokens keep their values.
WINDOW = 32


def _patch_oom() -> None:
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


def in_worker() -> None:
    """worker.py, before anything heavy: ``hang`` hangs here; others patch as in pytest."""
    name = os.environ.get(ENV)
    if name == "hang":
        print(f"worker {os.getpid()}: KVQ_FAULT=hang - not answering", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    if name:
        _patch(name)


def _patch(name: str) -> None:
    import torch
    from transformers import cache_utils as cu

    if name == "oom":
        _patch_oom()
        return
    if name == "hang":
        raise ValueError("KVQ_FAULT=hang applies to experiment workers (worker.py), not to the test process")

    quanto, hqq = cu.QuantoQuantizedLayer, cu.HQQQuantizedLayer
    q_quantize, h_quantize = quanto._quantize, hqq._quantize
    q_deq, h_deq = quanto._dequantize, hqq._dequantize
    if name == "full_precision":
        for cls in (quanto, hqq):
            cls._quantize = lambda self, tensor, axis: tensor.clone()
            cls._dequantize = lambda self, q: q
    elif name == "extra_copy":
        def keep(original):
            def _quantize(self, tensor, axis):
                self._shadow = getattr(self, "_shadow", []) + [tensor.clone()]
                return original(self, tensor, axis)
            return _quantize
        quanto._quantize, hqq._quantize = keep(q_quantize), keep(h_quantize)
    elif name == "ignore_residual":
        original_init = cu.QuantizedLayer.__init__

        def __init__(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self.residual_length = 10**9
        cu.QuantizedLayer.__init__ = __init__
    elif name == "more_bits":
        from optimum.quanto import qint4

        def quanto_more(self, tensor, axis):
            self.qtype = qint4
            return q_quantize(self, tensor, axis)

        def hqq_more(self, tensor, axis):
            self.nbits = 8
            return h_quantize(self, tensor, axis)
        quanto._quantize, hqq._quantize = quanto_more, hqq_more
    elif name in ("noise", "hqq_noise", "quanto_noise"):
        def noisy(original, level):
            def _dequantize(self, q):
                x = original(self, q)
                g = torch.Generator(device=x.device).manual_seed(0)
                return x + level * x.float().std() * torch.randn(x.shape, generator=g, device=x.device).to(x.dtype)
            return _dequantize
        if name == "noise":
            quanto._dequantize, hqq._dequantize = noisy(q_deq, 0.03), noisy(h_deq, 0.03)
        elif name == "hqq_noise":
            hqq._dequantize = noisy(h_deq, 0.30)
        else:
            quanto._dequantize = noisy(q_deq, 0.30)
    elif name == "attention_scale_drift":
        from transformers.models.llama import modeling_llama

        llama_init = modeling_llama.LlamaAttention.__init__

        def drifted_init(self, *args, **kwargs):
            llama_init(self, *args, **kwargs)
            self.scaling *= 1.1
        modeling_llama.LlamaAttention.__init__ = drifted_init
    elif name == "unquantized_copies":
        plain_update = cu.DynamicLayer.update

        def update_with_copies(self, *args, **kwargs):
            out = plain_update(self, *args, **kwargs)
            if type(self) is cu.DynamicLayer:  # the quantized layers subclass it
                self._copies = [t.clone() for t in (self.keys, self.values) for _ in range(6)]
            return out
        cu.DynamicLayer.update = update_with_copies
    elif name == "plain_cache_window":
        plain = cu.DynamicLayer.update

        def update_windowed(self, *args, **kwargs):
            keys, values = plain(self, *args, **kwargs)
            if type(self) is cu.DynamicLayer and values.shape[-2] > WINDOW:  # not the quantized subclasses
                values = values.clone()
                values[..., :-WINDOW, :] = 0  # shapes kept: the attention mask still fits
            return keys, values
        cu.DynamicLayer.update = update_windowed
    elif name == "hqq3_nan_after_flush":
        def counting(self, tensor, axis):
            self._quantizations = getattr(self, "_quantizations", 0) + 1  # keys and values: 2 per flush
            return h_quantize(self, tensor, axis)

        def nan_after_flush(self, q):
            x = h_deq(self, q)
            flushed = self._quantizations > 2  # the prompt's keys and values were the first two
            return torch.full_like(x, float("nan")) if self.nbits == 3 and flushed else x
        hqq._quantize, hqq._dequantize = counting, nan_after_flush
    elif name == "low_precision_scales":
        def low_quanto(self, tensor, axis):
            q = q_quantize(self, tensor, axis)
            q._scale.copy_(q._scale.to(torch.bfloat16).to(q._scale.dtype))
            return q

        def low_hqq(self, tensor, axis):
            codes, meta = h_quantize(self, tensor, axis)
            meta["scale"] = meta["scale"].to(torch.bfloat16).to(meta["scale"].dtype)
            return codes, meta
        quanto._quantize, hqq._quantize = low_quanto, low_hqq
    elif name == "double_dequantize":
        def twice(original):
            def _dequantize(self, q):
                original(self, q)
                return original(self, q)
            return _dequantize
        quanto._dequantize, hqq._dequantize = twice(q_deq), twice(h_deq)
    elif name == "quanto_slow_as_hqq":
        def quanto_with_hqq_cost(self, tensor, axis):
            if not hasattr(self, "_hqq_twin"):
                self._hqq_twin = hqq.__new__(hqq)
                self._hqq_twin.__dict__.update(self.__dict__)
                from hqq.core.quantize import Quantizer
                self._hqq_twin.quantizer = Quantizer
            h_quantize(self._hqq_twin, tensor, axis)  # result dropped: cost only
            return q_quantize(self, tensor, axis)
        quanto._quantize = quanto_with_hqq_cost
    elif name == "keep_dequantized":
        def kept(original):
            def _dequantize(self, q):
                self._last_dequantized = original(self, q)
                return self._last_dequantized
            return _dequantize
        quanto._dequantize, hqq._dequantize = kept(q_deq), kept(h_deq)
    elif name == "hqq_more_temporaries":
        def hqq_with_temporaries(self, tensor, axis):
            held = [tensor.float().clone() for _ in range(2)]
            out = h_quantize(self, tensor, axis)
            del held
            return out
        hqq._quantize = hqq_with_temporaries
    elif name == "stop_flushing_after_512":
        def stops(original):
            def _quantize(self, tensor, axis):
                if tensor.shape[-2] >= 512:
                    self.residual_length = 10**9  # from now on the residual only grows
                return original(self, tensor, axis)
            return _quantize
        quanto._quantize, hqq._quantize = stops(q_quantize), stops(h_quantize)
    elif name == "dequantize_via_float32":
        def via_float32(original):
            def _dequantize(self, q):
                x = original(self, q)
                wide = x.float()  # the copy built in float32, alive while it is cast back
                return wide.to(x.dtype)
            return _dequantize
        quanto._dequantize, hqq._dequantize = via_float32(q_deq), via_float32(h_deq)
    elif name == "dequantize_half_again":
        def half_again(original):
            calls = [0]

            def _dequantize(self, q):
                calls[0] += 1
                if calls[0] % 2:
                    original(self, q)  # result dropped: cost only
                return original(self, q)
            return _dequantize
        quanto._dequantize, hqq._dequantize = half_again(q_deq), half_again(h_deq)
    elif name == "dense_at_large_batch":
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
    elif name == "quanto_axis_ignored":
        quanto._quantize = lambda self, tensor, axis: q_quantize(self, tensor, -1)
    else:
        raise ValueError(f"unknown KVQ_FAULT {name!r}; valid: {', '.join(FAULTS)}")


def pytest_configure(config):
    name = os.environ.get(ENV)
    if name and name != "hang":  # hang is for the workers this process starts
        _patch(name)
