"""The test matrix as data: backends, model families, batch sizes, and the
validation of a user's narrowing of it (``--kv-backends`` and friends).

Nothing here imports torch or transformers, so collection errors for a bad
selection are instant and independent of the installed versions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


class SelectionError(ValueError):
    """A user asked for a matrix value that does not exist."""


@dataclass(frozen=True)
class BackendSpec:
    """One KV-cache configuration: a transformers backend, its bit width and axis.

    ``backend`` is transformers' spelling (``"quanto"``, ``"hqq"``, ``"fp8"``) or
    ``"none"`` for the unquantized DynamicCache.
    """

    name: str
    backend: str
    nbits: int | None = None
    axis: int | None = None

    @property
    def quantized(self) -> bool:
        return self.backend != "none"

    @property
    def broken(self) -> str | None:
        """Why this combination cannot run at all, or None. The one place that says so."""
        if self.backend == "hqq" and self.nbits == 3 and self.axis == 1:
            return ("hqq 3-bit with axis 1 fails at the first dequantize (hqq/core/quantize.py trims "
                    "rows as for a 2-D weight); use axis 0 or another nbits")
        return None

    @property
    def group_wise(self) -> bool:
        """quanto and hqq quantize in groups with a full-precision residual; fp8 does neither."""
        return self.backend in ("quanto", "hqq")


@dataclass(frozen=True)
class QuantSettings:
    """Group-wise settings shared by quanto and hqq; fp8 takes none of them."""

    q_group_size: int = 64
    residual_length: int = 128


# Which (nbits, axis) each backend accepts, from transformers 5.24's cache_utils.py
# (QuantoQuantizedLayer / HQQQuantizedLayer constructors). quanto's axis -1 is left out of
# the default matrix: it fails mid-generation on tiny configs (FACTS.md).
QUANTO_NBITS = (2, 4)
QUANTO_AXES = (0, -1)
HQQ_NBITS = (1, 2, 3, 4, 8)
HQQ_AXES = (0, 1)


def _build_backends() -> dict[str, BackendSpec]:
    specs = [BackendSpec("none", "none")]
    specs += [BackendSpec(f"quanto{n}", "quanto", n, 0) for n in QUANTO_NBITS]
    for axis in HQQ_AXES:
        for n in HQQ_NBITS:
            # axis 0 is transformers' default and the seed's setting: give it the short name.
            name = f"hqq{n}" if axis == 0 else f"hqq{n}-axis1"
            specs.append(BackendSpec(name, "hqq", n, axis))
    specs.append(BackendSpec("fp8", "fp8"))
    return {s.name: s for s in specs}


BACKENDS: dict[str, BackendSpec] = _build_backends()

# The seed's seven families (seed/000_*.txt, "Models support"), plus Mistral with its
# sliding window: transformers treats sliding-window models differently across versions.
SEED_FAMILIES: tuple[str, ...] = (
    "llama", "gemma", "recurrentgemma", "stablelm", "dbrx", "cohere", "olmo",
)
FAMILIES: tuple[str, ...] = SEED_FAMILIES + ("mistral",)

# Tiny-model batch sizes for the CPU tier; the memory scenarios carry their own.
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 4)


def _split(raw: str | None) -> list[str]:
    if raw is None:
        return []
    return [part.strip() for part in raw.split(",") if part.strip()]


def _explain_backend(value: str) -> str:
    """A hint for a near miss such as ``quanto8`` (quanto takes 2 or 4 bits)."""
    lowered = value.lower()
    for family, nbits in (("quanto", QUANTO_NBITS), ("hqq", HQQ_NBITS)):
        if lowered.startswith(family):
            allowed = " or ".join(str(n) for n in nbits)
            return f" ({family} takes {allowed} bits)"
    return ""


def select_backends(raw: str | None, available: Iterable[str] | None = None) -> list[BackendSpec]:
    """Parse ``--kv-backends``. ``available`` narrows to what the installed
    transformers supports (fp8 only exists in 5.x); asking for an unavailable one
    explicitly is an error rather than a silent drop."""
    known = list(BACKENDS)
    usable = known if available is None else [n for n in known if n in set(available)]
    names = _split(raw)
    if not names:
        return [BACKENDS[n] for n in usable]
    chosen = []
    for name in names:
        if name not in BACKENDS:
            raise SelectionError(
                f"unknown KV backend {name!r}{_explain_backend(name)}; valid: {', '.join(known)}"
            )
        if name not in usable:
            raise SelectionError(
                f"KV backend {name!r} is not available with the installed transformers; "
                f"available: {', '.join(usable)}"
            )
        chosen.append(BACKENDS[name])
    return chosen


def select_families(raw: str | None) -> list[str]:
    names = _split(raw)
    if not names:
        return list(FAMILIES)
    for name in names:
        if name not in FAMILIES:
            raise SelectionError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}")
    return names


def select_batch_sizes(raw: str | None, default: Iterable[int] = DEFAULT_BATCH_SIZES) -> list[int]:
    names = _split(raw)
    if not names:
        return list(default)
    sizes = []
    for name in names:
        if not name.isdigit() or int(name) < 1:
            raise SelectionError(f"batch size {name!r} is not a positive integer (e.g. --kv-batch-sizes 1,8)")
        sizes.append(int(name))
    return sizes
