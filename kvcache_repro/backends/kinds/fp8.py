"""``fp8``: transformers' Fp8QuantizedLayer (from 5.21 on): float8 codes and one float32
scale per tensor, frozen at the prompt's amplitude; no groups, no residual."""
from __future__ import annotations

from kvcache_repro.backends.kinds.base import BackendKind, CacheBytes, tensor_bytes


class Fp8(BackendKind):
    name = "fp8"
    cuda_layer_step_s = 0.8e-3  # a cast each way
    layer_class_name = "Fp8QuantizedLayer"

    def storage(self, layer) -> tuple:
        # keeps ``keys``/``values`` only as empty placeholders; everything is quantized
        return layer._quantized_keys, layer._quantized_values, None, None

    def stored_bytes(self, qstate) -> CacheBytes:
        codes, scale = qstate
        return CacheBytes(tensor_bytes(codes), tensor_bytes(scale), 0)

    def predicted_bytes(self, spec, n: int, group: int, itemsize: int) -> tuple[int, int]:
        return n, 4  # float8 codes + one float32 scale per tensor


KIND = Fp8()
