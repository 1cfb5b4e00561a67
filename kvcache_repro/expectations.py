"""Expected behaviour of transformers' quantized cache, keyed by version range.

Surprising-but-true behaviour is pinned here, in one place, so a release that changes
it fails a test that names the version, the entry and what was observed. Entries where
the release is wrong carry the upstream issue; their tests are xfail(strict=True), so a
fix flips them and is noticed. Measured on the dev machine (2-core CPU) with tiny seeded
models, transformers 4.57.6 and 5.24.0, optimum-quanto 0.2.7, hqq 0.2.8.post1.
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


V457 = VersionRange("4.57.0", "4.58.0")  # the last 4.x line
V5 = VersionRange("5.0.0", "6.0.0")  # 5.24.0 pinned; newer 5.x are expected to behave alike
SUPPORTED = (V457, V5)


class UnsupportedVersion(RuntimeError):
    pass


def current_range(version: str | None = None) -> VersionRange:
    version = version or transformers.__version__
    for rng in SUPPORTED:
        if rng.contains(version):
            return rng
    raise UnsupportedVersion(
        f"transformers {version} is not supported by this suite (supported: "
        f"{', '.join(map(str, SUPPORTED))}); install the pinned version with "
        f"`pip install -r requirements.txt`, or add its expectations to kvcache_repro/expectations.py"
    )


@dataclass(frozen=True)
class Expectation:
    value: str
    issue: str = ""  # upstream report, when the behaviour is a bug
    wrong: bool = False  # the release is wrong here: the test is xfail(strict=True)


# Family support with every quantized backend:
#   "quantizes": generation runs and every layer holds quantized storage
#   "rejected":  transformers' documented ValueError (non-full-attention layers)
#   "quantizes" + wrong: runs but does not quantize (a silent no-op), pinned as a bug
_FAMILIES_5 = {f: Expectation("quantizes") for f in ("llama", "gemma", "stablelm", "dbrx", "cohere", "olmo")}
FAMILY_SUPPORT = {
    V5: {**_FAMILIES_5,
         "recurrentgemma": Expectation("rejected"),  # recurrent + sliding-window layers
         "mistral": Expectation("rejected")},  # sliding-window layers
    V457: {**_FAMILIES_5,
           # accepted, but its recurrent/sliding cache layers never hold quantized storage
           "recurrentgemma": Expectation("quantizes", "silent no-op on 4.57; 5.x rejects it instead", wrong=True),
           # sliding layers replaced by full quantized ones: the window is ignored, so the
           # "quantized" cache outgrows the unquantized sliding one (16384 vs 15360 bytes
           # for the tiny config); 5.x rejects such models instead
           "mistral": Expectation("quantizes", "4.57 ignores the sliding window when quantizing: the cache "
                                               "grows past the unquantized one", wrong=True)},
}

# Batch invariance: does a row generate the same in a batch of 4 as alone?
#   "exact":  same tokens, logits within float noise (1e-5)
#   "tokens": same tokens, logits within 1e-2 (not bitwise: see hqq below)
#   "no":     tokens differ
# quanto axis 0 groups within a batch row. hqq axis 0 groups elements n/G apart, i.e.
# across rows. hqq axis 1 groups within a row, but hqq's proximal optimizer stops on the
# tensor-wide mean error (hqq/core/optimize.py, optimize_weights_proximal_legacy), so
# other rows change how long every group is optimized: 4-bit logits moved by 1.5e-3,
# 2- and 1-bit tokens changed. fp8's single per-tensor scale spans the batch.
_INVARIANCE = {
    "none": "exact", "quanto2": "exact", "quanto4": "exact",
    "hqq1": "no", "hqq2": "no", "hqq3": "no", "hqq4": "no", "hqq8": "no",
    "hqq1-axis1": "no", "hqq2-axis1": "no", "hqq4-axis1": "tokens", "hqq8-axis1": "tokens",
}
BATCH_INVARIANCE = {V5: {**_INVARIANCE, "fp8": "no"}, V457: dict(_INVARIANCE)}

# generate() leaves the caller's cache_config dict as it was.
CACHE_CONFIG_UNTOUCHED = {
    V5: Expectation("yes"),
    V457: Expectation("yes", "transformers #48700: generate() pops 'backend', a reused dict silently "
                             "switches to quanto", wrong=True),
}

# Beam search through a near-lossless quantized cache (hqq 8-bit) picks the same
# sequences as through the unquantized cache: reorder_cache must reorder the quantized
# store too.
BEAM_SEARCH_MATCHES = {
    V5: Expectation("yes"),  # 5.24 defers the reorder to the next update (cache_utils.py)
    V457: Expectation("yes", "transformers #48700: QuantizedLayer.reorder_cache reorders only the "
                             "residual, the quantized store keeps the old beam order", wrong=True),
}


# Whether a forward of several tokens (a divisor of residual_length) through a quantized
# layer flushes its residual after the same tokens as one token per forward ("same") or
# later ("later"). Up to 5.19 QuantizedLayer.update flushes on `residual + 1 >= R`, so a
# 16-token forward overfills the residual: at R 64 flushes come every 80 tokens
# (measured on 5.0.0 and 5.17.0: 128, 208, 288 against 128, 192, 256; 4.57.6 has the
# same line). 5.20.0 changed it to `residual + new >= R` (read in the 5.20.0-5.23.0
# wheels; measured on 5.24.0). The accuracy tables use 16-token forwards only where
# the flushes are the same (quality.effective_step).
MULTI_TOKEN_FLUSH = ((VersionRange("4.57.0", "5.20.0"), "later"), (VersionRange("5.20.0", "6.0.0"), "same"))


def multi_token_flush(version: str | None = None) -> str:
    version = version or transformers.__version__
    current_range(version)  # an unsupported release fails here, with the fix
    return next(value for rng, value in MULTI_TOKEN_FLUSH if rng.contains(version))


def _lookup(table: dict, key=None, version: str | None = None):
    entries = table[current_range(version)]
    return entries if key is None else entries[key]


def family_support(family: str, version: str | None = None) -> Expectation:
    return _lookup(FAMILY_SUPPORT, family, version)


def batch_invariance(spec: BackendSpec, version: str | None = None) -> str:
    return _lookup(BATCH_INVARIANCE, spec.name, version)


def cache_config_untouched(version: str | None = None) -> Expectation:
    return _lookup(CACHE_CONFIG_UNTOUCHED, version=version)


def beam_search_matches(version: str | None = None) -> Expectation:
    return _lookup(BEAM_SEARCH_MATCHES, version=version)
