"""The fault plugin's registry (kvcache_repro/faults.py): docs/faults.md names exactly its
faults, an unknown ``KVQ_FAULT`` is refused naming the valid ones, every fault says what it
does. Nothing here applies a fault or imports torch."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvcache_repro import faults

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "faults.md"
DIVIDER = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def doc_faults(text: str) -> dict[str, list[int]]:
    """Fault name -> the lines naming it: the first backticked word of each cell of a table
    column whose header starts with "fault"; such a cell that names none is an error."""
    named: dict[str, list[int]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if not (line.startswith("|") and DIVIDER.match(lines[i + 1])):
            continue
        columns = [j for j, head in enumerate(cells(line)) if head.lower().startswith("fault")]
        for n, row in enumerate(lines[i + 2:], start=i + 3):
            if not row.startswith("|"):
                break
            for j in columns:
                found = re.match(r"`(\w+)`", cells(row)[j])
                assert found, f"docs/faults.md line {n}: its fault column names no `fault`: {cells(row)[j]!r}"
                named.setdefault(found.group(1), []).append(n)
    return named


def mismatch(named: dict[str, list[int]], registered) -> list[str]:
    problems = [f"{name}: a fault of kvcache_repro/faults.py with no row in docs/faults.md"
                for name in registered if name not in named]
    problems += [f"{name}: named in docs/faults.md (line {', '.join(map(str, lines))}) but not a fault of "
                 "kvcache_repro/faults.py" for name, lines in named.items() if name not in registered]
    return problems


def test_the_doc_names_exactly_the_registry_s_faults():
    problems = mismatch(doc_faults(DOC.read_text()), faults.REGISTRY)
    assert not problems, "\n".join(problems)


def test_a_difference_between_doc_and_registry_is_named():
    doc = ("| fault | tests that fail |\n|---|---|\n| `noise` (3%) | bands |\n| `gone` (renamed) | x |\n\n"
           "| claim | fault, numbers |\n|---|---|\n| holds | `oom`: 1.0 |\n")
    assert doc_faults(doc) == {"noise": [3], "gone": [4], "oom": [8]}
    problems = mismatch(doc_faults(doc), ("noise", "oom", "hang"))
    assert problems == ["hang: a fault of kvcache_repro/faults.py with no row in docs/faults.md",
                        "gone: named in docs/faults.md (line 4) but not a fault of kvcache_repro/faults.py"]
    with pytest.raises(AssertionError, match="line 3: its fault column names no `fault`"):
        doc_faults("| fault | tests |\n|---|---|\n| noise | bands |\n")


def test_every_fault_has_a_description():
    assert faults.FAULTS == tuple(faults.REGISTRY) and len(faults.FAULTS) == len(set(faults.FAULTS))
    for name, fault in faults.REGISTRY.items():
        assert fault.name == name and callable(fault.apply)
        assert fault.description.strip(), f"fault {name!r} has no description"
        assert "\n" not in fault.description, f"fault {name!r}: its description is not one paragraph"
    assert {name for name, fault in faults.REGISTRY.items() if fault.machine} == {"oom", "hang"}


def test_a_fault_is_declared_once():
    with pytest.raises(ValueError, match="fault 'noise' declared twice"):
        faults.fault("noise", "again")(lambda: None)
    assert faults.REGISTRY["noise"].apply is not None and len(faults.REGISTRY) == len(faults.FAULTS)


UNKNOWN = "unknown KVQ_FAULT 'no_such_fault'; valid: "


def test_an_unknown_fault_is_refused_naming_the_valid_ones(monkeypatch):
    monkeypatch.setenv(faults.ENV, "no_such_fault")
    # the experiment's workers refuse it; the plugin with a usage error, not an internal one
    for call, error in ((lambda: faults.apply("no_such_fault"), ValueError), (faults.in_worker, ValueError),
                        (lambda: faults.pytest_configure(None), pytest.UsageError)):
        with pytest.raises(error) as caught:
            call()
        assert UNKNOWN + ", ".join(faults.FAULTS) in str(caught.value)


def test_hang_is_left_to_the_workers(monkeypatch):
    monkeypatch.setenv(faults.ENV, "hang")
    faults.pytest_configure(None)  # nothing to patch in the test process
    with pytest.raises(ValueError, match="applies to experiment workers"):
        faults.apply("hang")


def test_pytest_with_an_unknown_fault_stops_with_a_usage_error(tmp_path):
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    env = {**os.environ, faults.ENV: "no_such_fault", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "kvcache_repro.faults", "-p", "no:cacheprovider",
                           "--noconftest", "-q", "test_nothing.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "INTERNALERROR" not in done.stdout + done.stderr
    assert UNKNOWN + ", ".join(faults.FAULTS) in done.stderr


def test_the_module_lists_the_faults():
    done = subprocess.run([sys.executable, "-m", "kvcache_repro.faults"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    listed = [line.split(":")[0].split(" (machine)")[0] for line in done.stdout.splitlines()]
    assert tuple(listed) == faults.FAULTS
