"""Backend kinds: one module per kind of KV cache, each defining ``KIND``, a base.BackendKind
holding all the harness knows of it. ``KINDS`` keeps matrix.BACKENDS's order; the rest of the suite
asks a kind, never a name. Torch-free. A new backend: a module listed in _MODULES, its package in
core/provenance.PACKAGES, its rows in expectations' tables; or ``matrix.register_kind`` at run time."""
from __future__ import annotations

from kvcache_repro.backends.kinds import fp8, hqq, quanto, unquantized
from kvcache_repro.backends.kinds.base import BackendKind

_MODULES = (unquantized, quanto, hqq, fp8)
KINDS: dict[str, BackendKind] = {m.KIND.name: m.KIND for m in _MODULES}
