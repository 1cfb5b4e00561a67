"""Expected behaviour of transformers' quantized cache, keyed by version range.

Surprising-but-true behaviour is pinned here, in one place, so a release that changes
it fails a test that names the version, the entry and what was observed. Each entry
says where it was measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import transformers
from packaging.version import Version

from .matrix import BackendSpec


@dataclass(frozen=True)
class VersionRange:
    low: str  # inclusive
    high: str  # exclusive

    def contains(self, version: str) -> bool:
        return Version(self.low) <= Version(version) < Version(self.high)

    def __str__(self) -> str:
        return f">={self.low},<{self.high}"


V5 = VersionRange("5.0.0", "6.0.0")
SUPPORTED = (V5,)


class UnsupportedVersion(RuntimeError):
    pass


def current_range(version: str | None = None) -> VersionRange:
    version = version or transformers.__version__
    for rng in SUPPORTED:
        if rng.contains(version):
            return rng
    raise UnsupportedVersion(
        f"transformers {version} is outside the ranges this suite has expectations for "
        f"({', '.join(map(str, SUPPORTED))}); install the pinned version from requirements.txt"
    )


# Family support: "quantizes" or "rejected" (transformers raises its documented
# ValueError for non-full-attention layers). Measured on 5.24.0 with the tiny configs.
FAMILY_SUPPORT = {
    V5: {
        "llama": "quantizes", "gemma": "quantizes", "stablelm": "quantizes", "dbrx": "quantizes",
        "cohere": "quantizes", "olmo": "quantizes",
        "recurrentgemma": "rejected",  # recurrent + sliding-window layers
    },
}

# Batch invariance: does a row generate the same in a batch of 4 as alone?
#   "exact":  same tokens, logits within float noise (1e-5)
#   "tokens": same tokens, logits within 1e-2 (not bitwise: see hqq below)
#   "no":     tokens differ
# Measured on 5.24.0 / hqq 0.2.8.post1 / optimum-quanto 0.2.7, tiny llama, seed 0.
# quanto axis 0 groups within a batch row. hqq axis 0 groups elements n/G apart, i.e.
# across rows. hqq axis 1 groups within a row, but hqq's proximal optimizer stops on the
# tensor-wide mean error (hqq/core/optimize.py, optimize_weights_proximal_legacy), so
# other rows change how long every group is optimized: 4-bit logits moved by 1.5e-3,
# 2- and 1-bit tokens changed. fp8's single per-tensor scale spans the batch.
BATCH_INVARIANCE = {
    V5: {
        "none": "exact", "quanto2": "exact", "quanto4": "exact",
        "hqq1": "no", "hqq2": "no", "hqq3": "no", "hqq4": "no", "hqq8": "no",
        "hqq1-axis1": "no", "hqq2-axis1": "no", "hqq4-axis1": "tokens", "hqq8-axis1": "tokens",
        "fp8": "no",
    },
}


def family_support(family: str, version: str | None = None) -> str:
    return FAMILY_SUPPORT[current_range(version)][family]


def batch_invariance(spec: BackendSpec, version: str | None = None) -> str:
    return BATCH_INVARIANCE[current_range(version)][spec.name]
