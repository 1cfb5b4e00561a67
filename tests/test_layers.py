"""Layers run one way: a module imports only from its own subpackage or from a layer below it
(LAYERS, from the bottom up), at the top of a file or inside a function alike; so no two
subpackages import each other."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kvcache_repro"
LAYERS = [("core",), ("faults",), ("backends",), ("measure",), ("verdicts",), ("runner",), ("releases", "gpu"),
          ("plugin",), ("commands",), ("__main__",)]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == PACKAGE and len(parts) > 1 else None


def _imports(path: Path, module: str):
    """(line, imported module) of every import in ``path``, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")[: -node.level] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target == PACKAGE:  # from kvcache_repro import faults
                yield from ((node.lineno, f"{PACKAGE}.{a.name}") for a in node.names)
            else:
                yield node.lineno, target


def upward_imports(root: Path) -> list[str]:
    """Every import of ``root/kvcache_repro`` across layers up or sideways; every part in no layer."""
    found = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts)
        own = _part(module)
        if own in (None, "__init__"):
            continue
        if own not in RANK:
            found.append(f"{rel}: {own} is in no layer (add it to LAYERS in tests/test_layers.py)")
            continue
        for line, target in _imports(path, module):
            other = _part(target)
            if other is None or other == own or other == "__init__":
                continue
            if other not in RANK or RANK[other] >= RANK[own]:
                found.append(f"{rel}:{line} imports {target}: {own} may import only layers below it "
                             f"({', '.join(n for n, r in RANK.items() if r < RANK[own]) or 'none'})")
    return found


def test_layers_run_one_way():
    assert upward_imports(ROOT) == []


def test_an_upward_or_sideways_import_is_named(tmp_path):
    """A lower layer importing a higher one (inside a function too) and two layers of one rank
    importing each other are each found with their file and line."""
    pkg = tmp_path / PACKAGE
    for sub in ("measure", "runner", "gpu", "releases"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "measure" / "m.py").write_text("import os\n\n\ndef f():\n    from kvcache_repro.runner import r\n")
    (pkg / "runner" / "r.py").write_text("from kvcache_repro.measure import m\nfrom . import x\n")
    (pkg / "gpu" / "g.py").write_text("from kvcache_repro.releases import c\n")
    found = upward_imports(tmp_path)
    assert len(found) == 2, found
    assert found[0].startswith("kvcache_repro/gpu/g.py:1 imports kvcache_repro.releases: gpu may import")
    assert found[1].startswith("kvcache_repro/measure/m.py:5 imports kvcache_repro.runner")


def test_no_module_is_over_400_lines():
    """A module past 400 lines holds more than one idea: split it along its seams."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / PACKAGE).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, long
