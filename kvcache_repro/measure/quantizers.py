"""Group-level view of one quantize/dequantize round trip, for quanto and hqq.

Both backends are affine: a group's codes q in {0..2^n-1} map back to
``lo + q * step``. This module reads ``step``, ``lo`` and ``hi`` (the values of the
lowest and highest code) out of each backend's stored metadata, and lines the original
and restored values up group by group, so tests can check the round trip against
round-to-nearest on that grid.

Layouts (optimum-quanto 0.2.7 ``tensor/grouped.py`` and ``optimizers/max_optimizer.py``;
hqq 0.2.8 ``core/quantize.py``):
- quanto axis 0 groups ``reshape(-1, G)`` (G consecutive elements); axis -1 groups
  ``(G, n)`` after a permute. Dequantize: ``q * scale - shift``.
- hqq axis 1 groups ``reshape(-1, G)``; axis 0 groups the columns of ``reshape(G, -1)``
  (elements n/G apart, which is why axis 0 mixes batch rows). Dequantize:
  ``(q - zero) * scale``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache_repro.backends import caches
from kvcache_repro.measure.accounting import CacheBytes, _quantized_bytes
from kvcache_repro.backends.matrix import BackendSpec


@dataclass(frozen=True)
class RoundTrip:
    original: torch.Tensor  # (groups, G), float32
    restored: torch.Tensor  # (groups, G), float32
    step: torch.Tensor  # (groups, 1): distance between adjacent codes
    lo: torch.Tensor  # (groups, 1): value of code 0
    hi: torch.Tensor  # (groups, 1): value of the top code
    stored: CacheBytes  # bytes of codes and metadata


def _as_rows(t: torch.Tensor, groups_are_rows: bool, group_size: int) -> torch.Tensor:
    t = t.float()
    return t.reshape(-1, group_size) if groups_are_rows else t.reshape(group_size, -1).t()


def _quanto_groups(base: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    from optimum.quanto.tensor.grouped import group

    grouped = group(base.float(), axis, group_size)
    return grouped if axis == 0 else grouped.t()


def round_trip(spec: BackendSpec, settings: caches.QuantSettings, tensor: torch.Tensor) -> RoundTrip:
    qstate, restored = caches.quantize_once(spec, settings, tensor)
    G, top = settings.q_group_size, 2**spec.nbits - 1
    if spec.backend == "quanto":
        original = _quanto_groups(tensor, spec.axis, G)
        back = _quanto_groups(restored, spec.axis, G)
        scale = qstate._scale.float().reshape(-1, 1)
        shift = qstate._shift.float().reshape(-1, 1)
        step, lo = scale, -shift
    elif spec.backend == "hqq":
        rows = spec.axis == 1
        original = _as_rows(tensor, rows, G)
        back = _as_rows(restored, rows, G)
        _, meta = qstate
        step = meta["scale"].float().reshape(-1, 1)
        lo = -meta["zero"].float().reshape(-1, 1) * step
    else:
        raise ValueError(f"{spec.name}: only group-wise backends have a per-group grid")
    return RoundTrip(original, back, step, lo, lo + top * step, _quantized_bytes(spec.backend, qstate))
