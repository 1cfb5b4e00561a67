"""``hqq``: HQQ's quantizer (transformers' HQQQuantizedLayer); it keeps ``(W_q, meta)``, of
which only ``meta['scale']`` and ``meta['zero']`` are tensors beside the codes.

transformers 5.24's cache_utils.py accepts nbits 1, 2, 3, 4, 8 and axis 0 or 1. Layouts from
hqq 0.2.8 ``core/quantize.py`` + ``core/bitpack.py``: axis 1 groups ``reshape(-1, G)``; axis 0
groups the columns of ``reshape(G, -1)`` (elements n/G apart, which is why axis 0 mixes batch
rows). Dequantize: ``(q - zero) * scale``.
"""
from __future__ import annotations

import math

from kvcache_repro.backends.kinds.base import CacheBytes, GroupWiseKind, tensor_bytes


class Hqq(GroupWiseKind):
    name = "hqq"
    cuda_layer_step_s = 1.3e-3  # its dequantize launches more kernels than quanto's
    layer_class_name = "HQQQuantizedLayer"
    package, module = "hqq", "hqq.core.quantize"
    nbits = (1, 2, 3, 4, 8)
    axes, row_axis = (0, 1), 1
    cuda_transient_low = 0.5  # works in float16 on CUDA, float32 on CPU

    def broken(self, spec) -> str | None:
        if spec.nbits == 3 and spec.axis == 1:
            return ("hqq 3-bit with axis 1 fails at the first dequantize (hqq/core/quantize.py trims "
                    "rows as for a 2-D weight); use axis 0 or another nbits")
        return None

    def stored_bytes(self, qstate) -> CacheBytes:
        codes, meta = qstate
        if not isinstance(meta, dict) or "scale" not in meta or "zero" not in meta:
            # not quantized: "other", so the byte comparison fails naming it, not a KeyError
            return CacheBytes(0, 0, 0, tensor_bytes(codes))
        return CacheBytes(tensor_bytes(codes), tensor_bytes(meta["scale"]) + tensor_bytes(meta["zero"]), 0)

    def describe(self, qstate) -> str:
        codes, meta = qstate
        if not isinstance(meta, dict) or "scale" not in meta:
            return f"a {codes.dtype} tensor {tuple(codes.shape)} without scales or zeros (not quantized)"
        return f"hqq codes {codes.dtype} {tuple(codes.shape)}, axis {meta.get('axis')}"

    def packed_bytes(self, spec, n: int, group: int) -> int:
        """3-bit: 10 codes per int32, the packed dimension (axis 0: G, 1: n/G) padded to 10."""
        if spec.nbits != 3:
            return super().packed_bytes(spec, n, group)
        groups = n // group
        return 4 * math.ceil(group / 10) * groups if spec.axis == 0 else 4 * math.ceil(groups / 10) * group

    def packing_problem(self, spec, groups: int, seq: int) -> str | None:
        """axis 1: B*H*S*D/G rows must be a multiple of 8/nbits (else dequantize fails)."""
        per_byte = 8 // spec.nbits
        if spec.axis == 1 and spec.nbits in (1, 2, 4) and groups % per_byte:
            return (f"hqq packs {per_byte} groups per byte along axis 1 but the tensor at sequence {seq} "
                    f"has {groups} groups (B*H*S*D/G); choose a batch/prompt length making it a multiple "
                    f"of {per_byte}")
        return None

    def grid(self, spec, group: int, tensor, restored, qstate) -> tuple:
        def groups(t):
            return t.float().reshape(-1, group) if spec.axis == 1 else t.float().reshape(group, -1).t()

        _, meta = qstate
        step = meta["scale"].float().reshape(-1, 1)
        return groups(tensor), groups(restored), step, -meta["zero"].float().reshape(-1, 1) * step


KIND = Hqq()
