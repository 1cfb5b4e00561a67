"""``quanto``: optimum-quanto's affine quantizer (transformers' QuantoQuantizedLayer).

transformers 5.24's cache_utils.py accepts nbits 2 or 4 and axis 0 or -1; axis -1 is left
out of the matrix: it fails mid-generation on tiny configs (docs/facts.md). Layouts from
optimum-quanto 0.2.7 ``tensor/grouped.py``: axis 0 groups ``reshape(-1, G)`` within a batch
row, axis -1 groups ``(G, n)`` after a permute; dequantize ``q * scale - shift``.
"""
from __future__ import annotations

from kvcache_repro.backends.kinds.base import CacheBytes, GroupWiseKind, tensor_bytes


class Quanto(GroupWiseKind):
    name = "quanto"
    layer_class_name = "QuantoQuantizedLayer"
    package, module = "optimum-quanto", "optimum.quanto"
    nbits = (2, 4)
    row_axis = 0

    def stored_bytes(self, qstate) -> CacheBytes:
        # .nbytes is the DENSE size: count the flattened packed data, scale, shift
        names, _ = qstate.__tensor_flatten__()
        data = sum(tensor_bytes(getattr(qstate, n)) for n in names if n == "_data")
        meta = sum(tensor_bytes(getattr(qstate, n)) for n in names if n != "_data")
        return CacheBytes(data, meta, 0)

    def describe(self, qstate) -> str:
        return f"{type(qstate).__name__} {tuple(qstate.shape)}, axis {getattr(qstate, 'axis', '?')}"

    def grouped(self, spec, numel: int, batch: int, head_dim: int) -> tuple[int, str]:
        """axis 0: G divides H*S*D (one row per batch element); axis -1: G divides B*H*S."""
        return (numel // batch, "H*S*D per batch row") if spec.axis == 0 else (numel // head_dim, "B*H*S")

    def grid(self, spec, group: int, tensor, restored, qstate) -> tuple:
        from optimum.quanto.tensor.grouped import group as grouping

        def groups(t):
            g = grouping(t.float(), spec.axis, group)
            return g if spec.axis == 0 else g.t()

        step, shift = qstate._scale.float().reshape(-1, 1), qstate._shift.float().reshape(-1, 1)
        return groups(tensor), groups(restored), step, -shift

    def prepare(self, log) -> str | None:  # its C++ extension, maybe its Python unpack
        from kvcache_repro.backends import quanto_ext, quanto_unpack

        log(quanto_ext.prepare())
        return quanto_unpack.install_if_requested()


KIND = Quanto()
