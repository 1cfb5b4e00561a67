"""The test matrix as data: backends, model families, batch sizes, and the
validation of a user's narrowing of it (``--kv-backends`` and friends).

Nothing here imports torch or transformers, so collection errors for a bad
selection are instant and independent of the installed versions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from kvcache_repro.backends.kinds import KINDS, BackendKind


class SelectionError(ValueError):
    """A user asked for a matrix value that does not exist."""


@dataclass(frozen=True)
class BackendSpec:
    """One KV-cache configuration: a backend kind (``backend``, transformers' spelling, or
    ``"none"`` for the unquantized DynamicCache), its bit width and axis. What differs
    between kinds, the kind says (kinds/)."""

    name: str
    backend: str
    nbits: int | None = None
    axis: int | None = None

    @property
    def kind(self) -> BackendKind:
        return KINDS[self.backend]

    @property
    def quantized(self) -> bool:
        return self.kind.quantized

    @property
    def broken(self) -> str | None:
        """Why this combination cannot run at all, or None (its kind's ``broken``)."""
        return self.kind.broken(self)

    @property
    def group_wise(self) -> bool:
        """quanto and hqq quantize in groups with a full-precision residual; fp8 does neither."""
        return self.kind.group_wise


@dataclass(frozen=True)
class QuantSettings:
    """Group-wise settings shared by quanto and hqq; fp8 takes none of them."""

    q_group_size: int = 64
    residual_length: int = 128


def _build_backends() -> dict[str, BackendSpec]:
    """Every kind's rows (its nbits x axes grid), in kinds.KINDS order."""
    return {name: BackendSpec(name, kind.name, n, axis) for kind in KINDS.values() for name, n, axis in kind.rows()}


BACKENDS: dict[str, BackendSpec] = _build_backends()


def rebuild() -> None:
    """BACKENDS again, in place, after kinds.register/unregister."""
    BACKENDS.clear()
    BACKENDS.update(_build_backends())


# The seed's seven families (docs/seed.md, "Models support"), plus Mistral with its
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
    for kind in KINDS.values():
        if kind.nbits and value.lower().startswith(kind.name):
            return f" ({kind.name} takes {' or '.join(str(n) for n in kind.nbits)} bits)"
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
