"""Backend kinds: one module per kind of KV cache (unquantized, quanto, hqq, fp8), each
defining ``KIND``, a base.BackendKind that holds all the harness knows of it: its name in
transformers, its matrix rows, its cache arguments, how its stored bytes are counted and
predicted, what it refuses, its package. ``KINDS`` is built from those modules in this
order (matrix.BACKENDS's order); the rest of the suite asks a kind, never a name.

Adding a backend: a module here with its KIND, listed in _MODULES; its package (if any) in
core/provenance.PACKAGES; its rows in tables keyed by backend name (expectations.BATCH_INVARIANCE).
``register`` adds a kind at run time (tests/test_backend_registry.py). Torch-free.
"""
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
