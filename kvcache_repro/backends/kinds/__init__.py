"""Backend kinds: one module per kind of KV cache, each defining ``KIND``, a base.BackendKind
holding all the harness knows of it. ``KINDS`` keeps matrix.BACKENDS's order; the rest of the suite
asks a kind, never a name. Torch-free. A new backend: a module listed in _MODULES, its package in
core/provenance.PACKAGES, its rows in expectations' tables; or ``register`` at run time."""
from __future__ import annotations

from kvcache_repro.backends.kinds import fp8, hqq, quanto, unquantized
from kvcache_repro.backends.kinds.base import BackendKind

_MODULES = (unquantized, quanto, hqq, fp8)
KINDS: dict[str, BackendKind] = {m.KIND.name: m.KIND for m in _MODULES}


def register(kind: BackendKind) -> BackendKind:
    """Add ``kind`` after the others; its rows join matrix.BACKENDS (in place)."""
    if kind.name in KINDS:
        raise ValueError(f"a backend kind named {kind.name!r} exists already")
    KINDS[kind.name] = kind
    _rebuild_matrix()
    return kind


def unregister(name: str) -> None:
    del KINDS[name]
    _rebuild_matrix()


def _rebuild_matrix() -> None:
    from kvcache_repro.backends import matrix

    matrix.rebuild()
