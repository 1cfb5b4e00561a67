"""``none``: transformers' DynamicCache, everything kept in full precision (the reference)."""
from __future__ import annotations

from kvcache_repro.backends.kinds.base import BackendKind, residual


class Unquantized(BackendKind):
    name = "none"
    cuda_layer_step_s = 0.7e-3  # ~35 ms a token for a 32-layer 7B fp16 on an A100, ~7 ms of it reading weights
    layer_class_name = "DynamicLayer"
    quantized = False

    def build_cache(self, spec, model_config, settings):
        from transformers import DynamicCache

        return DynamicCache(config=model_config)

    def storage(self, layer) -> tuple:
        return None, None, residual(layer.keys), residual(layer.values)


KIND = Unquantized()
