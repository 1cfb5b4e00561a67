"""The protocol of a backend kind: everything the harness asks of one kind of KV cache, so that
no module branches on a backend's name. Torch-free at import (matrix.py, collection and the CLI
help import it): torch and transformers are imported inside the methods."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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


def plain_tensors(obj) -> list:
    """The plain tensors behind a tensor subclass (recursively), or the tensor itself."""
    import torch

    if isinstance(obj, torch.Tensor) and type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return [t for name in names for t in plain_tensors(getattr(obj, name))]
    if isinstance(obj, torch.Tensor):
        return [obj]
    raise TypeError(f"not a tensor: {type(obj).__name__}")


def tensor_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in plain_tensors(obj))


def residual(t):
    """A full-precision tensor a layer holds, or None for an empty placeholder."""
    import torch

    return t if isinstance(t, torch.Tensor) and t.numel() > 0 else None


class BackendKind:
    """A kind sets these attributes and overrides what differs; ``spec`` arguments are its
    matrix.BackendSpec rows, ``settings`` a matrix.QuantSettings."""

    name = ""  # transformers' spelling: cache_config["backend"], QuantizedCache(name, ...)
    layer_class_name = ""  # its layers' class in transformers.cache_utils, if any
    package: str | None = None  # the pip package that quantizes (version reports)
    module: str | None = None  # what must import for it to run (the GPU bundle's check)
    quantized = True
    group_wise = False  # in groups, with a full-precision residual
    nbits: tuple[int, ...] = ()  # none: one row, named as the kind
    axes: tuple[int, ...] = (0,)  # the first (the default) gets the short name
    row_axis: int | None = None  # whose groups each lie within one batch row
    cuda_transient_low = 1.0  # a CPU transient's lowest factor on CUDA
    # seconds of kernel launches per layer per decode step on a GPU (HF eager decode is
    # launch-bound): the plan's predicted time (gpu/plan.py planned_seconds)
    cuda_layer_step_s = 1.0e-3

    def rows(self) -> list[tuple[str, int | None, int | None]]:
        """(matrix name, nbits, axis) of each matrix row: quanto2, hqq4-axis1, fp8."""
        if not self.nbits:
            return [(self.name, None, None)]
        return [(f"{self.name}{n}" + ("" if axis == self.axes[0] else f"-axis{axis}"), n, axis)
                for axis in self.axes for n in self.nbits]

    def broken(self, spec) -> str | None:  # why this combination cannot run at all
        return None

    def layer_class(self):  # None where this transformers has no such layer
        import transformers.cache_utils as cu

        return getattr(cu, self.layer_class_name, None)

    def cache_kwargs(self, spec, settings) -> dict[str, Any]:  # QuantizedCache's and the layer's
        return {}

    def build_cache(self, spec, model_config, settings):
        from transformers import QuantizedCache

        return QuantizedCache(self.name, model_config, **self.cache_kwargs(spec, settings))

    def storage(self, layer) -> tuple:
        """(quantized keys, quantized values, residual keys, residual values) of one layer.
        getattr: 4.57 creates the quantized attributes only on the first update, which a model
        may never call (RecurrentGemma on 4.57)."""
        return (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None),
                residual(getattr(layer, "keys", None)), residual(getattr(layer, "values", None)))

    def stored_bytes(self, qstate) -> CacheBytes:  # of one quantized tensor as its layer stores it
        raise NotImplementedError(f"{self.name}: no byte model for its stored state")

    def describe(self, qstate) -> str:  # a quantized tensor in words
        return type(qstate).__name__

    def predicted_bytes(self, spec, n: int, group: int, itemsize: int) -> tuple[int, int]:
        """(packed, metadata) bytes of ``n`` quantized values of one tensor (measure/accounting.py)."""
        raise NotImplementedError(f"{self.name}: no analytic byte model")

    def grouped(self, spec, numel: int, batch: int, head_dim: int) -> tuple[int, str]:
        return numel, "B*H*S*D"  # what q_group_size must divide, named

    def packing_problem(self, spec, groups: int, seq: int) -> str | None:  # a shape error to come
        return None

    def grid(self, spec, group: int, tensor, restored, qstate) -> tuple:
        """(original, restored, step, lo) per group, (groups, G) and (groups, 1): the affine grid
        ``lo + q * step`` read out of the stored metadata (measure/quantizers.py)."""
        raise ValueError(f"{spec.name}: only group-wise backends have a per-group grid")

    def prepare(self, log) -> str | None:  # ready a worker before its model loads
        return None


class GroupWiseKind(BackendKind):
    """quanto's and hqq's common part: a scale and a zero-point per group, in the model dtype."""

    group_wise = True

    def cache_kwargs(self, spec, settings) -> dict[str, Any]:
        return {"nbits": spec.nbits, "axis_key": spec.axis, "axis_value": spec.axis,
                "q_group_size": settings.q_group_size, "residual_length": settings.residual_length}

    def packed_bytes(self, spec, n: int, group: int) -> int:
        return n * spec.nbits // 8

    def predicted_bytes(self, spec, n: int, group: int, itemsize: int) -> tuple[int, int]:
        return self.packed_bytes(spec, n, group), 2 * (n // group) * itemsize
