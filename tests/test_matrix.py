"""Narrowing the matrix from the command line: good selections parse, bad ones fail
with the bad value and the valid ones named."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvcache_repro.backends import matrix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_selection_narrows_the_matrix():
    assert [b.name for b in matrix.select_backends("none,quanto4,hqq2")] == ["none", "quanto4", "hqq2"]
    assert matrix.select_families("llama,olmo") == ["llama", "olmo"]
    assert matrix.select_batch_sizes("1,8") == [1, 8]


def test_default_matrix_is_the_issue_s_matrix():
    """none; quanto 2/4; hqq 1/2/3/4/8 on axis 0 and 1; fp8; the seed's seven families
    (+ a sliding-window Mistral)."""
    names = set(matrix.BACKENDS)
    assert {"none", "quanto2", "quanto4", "fp8"} <= names
    assert {f"hqq{n}{s}" for n in (1, 2, 3, 4, 8) for s in ("", "-axis1")} <= names
    seven = {"llama", "gemma", "recurrentgemma", "stablelm", "dbrx", "cohere", "olmo"}
    assert set(matrix.SEED_FAMILIES) == seven
    assert set(matrix.FAMILIES) == set(matrix.SEED_FAMILIES) | {"mistral"}


@pytest.mark.parametrize("raw, fragment", [
    ("quanto8", "quanto takes 2 or 4 bits"),
    ("hqq5", "hqq takes 1 or 2 or 3 or 4 or 8 bits"),
    ("int4", "valid: none, quanto2"),
])
def test_unknown_backend_names_value_and_valid_ones(raw, fragment):
    with pytest.raises(matrix.SelectionError) as info:
        matrix.select_backends(raw)
    assert repr(raw) in str(info.value) and fragment in str(info.value)


def test_backend_missing_from_this_transformers_is_an_error_not_a_silent_drop():
    with pytest.raises(matrix.SelectionError, match="'fp8' is not available"):
        matrix.select_backends("fp8", available=["none", "quanto4"])


@pytest.mark.parametrize("func, raw, fragment", [
    (matrix.select_families, "mixtral", "valid: llama, gemma"),
    (matrix.select_batch_sizes, "0", "not a positive integer"),
    (matrix.select_batch_sizes, "eight", "not a positive integer"),
])
def test_bad_family_or_batch_size(func, raw, fragment):
    with pytest.raises(matrix.SelectionError, match=fragment):
        func(raw)


def test_bad_selection_fails_collection_with_the_message():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "--kv-backends", "none,quanto8",
         "tests/test_matrix.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage-error exit code
    assert "unknown KV backend 'quanto8' (quanto takes 2 or 4 bits)" in proc.stderr
