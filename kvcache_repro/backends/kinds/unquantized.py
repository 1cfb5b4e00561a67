"""``none``: transformers' DynamicCache, everything kept in full precision (the reference)."""
from __future__ import annotations

from kvcache_repro.backends.kinds.base import BackendKind, residual


class Unquantized(BackendKind):
    name = "none"
    layer_class_name = "DynamicLayer"
    quantized = False

    def build_cache(self, spec, model_config, settings):
        from transformers import DynamicCache

        return DynamicCache(config=model_config)

    def storage(self, layer) -> tuple:
        return None, None, residual(layer.keys), residual(layer.values)


KIND = Unquantized()
