"""The test matrix as data (backends, model families, batch sizes) and the validation of a user's
narrowing of it (``--kv-backends`` ...). Torch-free, so a bad selection fails collection at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from kvcache_repro.backends.kinds import KINDS, BackendKind


class SelectionError(ValueError):
    """A user asked for a matrix value that does not exist."""


@dataclass(frozen=True)
class BackendSpec:
    """One KV-cache configuration: a backend kind (transformers' spelling, ``"none"`` for the
    DynamicCache), its bit width and axis; the kind says what differs (kinds/)."""

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


SEED_SETTINGS = QuantSettings(q_group_size=128, residual_length=64)  # the seed's (docs/seed.md)


BACKENDS: dict[str, BackendSpec] = {}


def rebuild() -> None:
    """BACKENDS, in place: every kind's rows (its nbits x axes grid), in kinds.KINDS order."""
    BACKENDS.clear()
    BACKENDS.update({name: BackendSpec(name, kind.name, n, axis)
                     for kind in KINDS.values() for name, n, axis in kind.rows()})


rebuild()


def register_kind(kind: BackendKind) -> BackendKind:
    """Add ``kind`` after the others (kinds.KINDS); its rows join BACKENDS, in place."""
    if kind.name in KINDS:
        raise ValueError(f"a backend kind named {kind.name!r} exists already")
    KINDS[kind.name] = kind
    rebuild()
    return kind


def unregister_kind(name: str) -> None:
    del KINDS[name]
    rebuild()

# The seed's seven families (docs/seed.md, "Models support"), plus Mistral with its
# sliding window: transformers treats sliding-window models differently across versions.
SEED_FAMILIES: tuple[str, ...] = (
    "llama", "gemma", "recurrentgemma", "stablelm", "dbrx", "cohere", "olmo",
)
FAMILIES: tuple[str, ...] = SEED_FAMILIES + ("mistral",)

# Tiny-model batch sizes for the CPU tier; the memory scenarios carry their own.
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 4)


def _split(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def select_backends(raw: str | None, available: Iterable[str] | None = None) -> list[BackendSpec]:
    """Parse ``--kv-backends``; ``available`` narrows to what the installed transformers supports,
    and asking for one outside it is an error, not a silent drop."""
    known = list(BACKENDS)
    usable = known if available is None else [n for n in known if n in set(available)]
    for name in _split(raw):
        if name not in BACKENDS:
            hint = next((f" ({k.name} takes {' or '.join(map(str, k.nbits))} bits)" for k in KINDS.values()
                         if k.nbits and name.lower().startswith(k.name)), "")  # a near miss: quanto8
            raise SelectionError(f"unknown KV backend {name!r}{hint}; valid: {', '.join(known)}")
        if name not in usable:
            raise SelectionError(f"KV backend {name!r} is not available with the installed transformers; "
                                 f"available: {', '.join(usable)}")
    return [BACKENDS[n] for n in _split(raw) or usable]


def select_families(raw: str | None) -> list[str]:
    for name in _split(raw):
        if name not in FAMILIES:
            raise SelectionError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}")
    return _split(raw) or list(FAMILIES)


def select_batch_sizes(raw: str | None, default: Iterable[int] = DEFAULT_BATCH_SIZES) -> list[int]:
    for name in _split(raw):
        if not name.isdigit() or int(name) < 1:
            raise SelectionError(f"batch size {name!r} is not a positive integer (e.g. --kv-batch-sizes 1,8)")
    return [int(n) for n in _split(raw)] or list(default)
