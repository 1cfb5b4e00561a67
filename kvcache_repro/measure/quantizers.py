"""Group-level view of one quantize/dequantize round trip, for quanto and hqq: both are
affine, a group's codes q in {0..2^n-1} map back to ``lo + q * step``; the kind's ``grid``
reads ``step`` and ``lo`` from its metadata and lines values up group by group."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache_repro.backends import caches
from kvcache_repro.backends.matrix import BackendSpec
from kvcache_repro.measure.accounting import CacheBytes, _quantized_bytes


@dataclass(frozen=True)
class RoundTrip:
    original: torch.Tensor  # (groups, G), float32
    restored: torch.Tensor  # (groups, G), float32
    step: torch.Tensor  # (groups, 1): distance between adjacent codes
    lo: torch.Tensor  # (groups, 1): value of code 0
    hi: torch.Tensor  # (groups, 1): value of the top code
    stored: CacheBytes  # bytes of codes and metadata


def round_trip(spec: BackendSpec, settings: caches.QuantSettings, tensor: torch.Tensor) -> RoundTrip:
    qstate, restored = caches.quantize_once(spec, settings, tensor)
    original, back, step, lo = spec.kind.grid(spec, settings.q_group_size, tensor, restored, qstate)
    hi = lo + (2**spec.nbits - 1) * step
    return RoundTrip(original, back, step, lo, hi, _quantized_bytes(spec.backend, qstate))
