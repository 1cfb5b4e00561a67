"""Installed, the suite's plugin is loaded by its pytest11 entry point in every pytest of that
environment: in another project it adds its options and nothing else (no thread pinning, no
gpu/slow gates, no quanto build check), and in this checkout it refuses a kvcache_repro
imported from somewhere else, whose baselines would be missing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "kvcache_repro.plugin", "-p", "no:cacheprovider",
                           "-q", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_in_another_project_the_plugin_only_adds_options(tmp_path):
    (tmp_path / "test_other.py").write_text(
        "import os, pytest\n\n\n@pytest.mark.gpu\ndef test_theirs():\n    assert 'OMP_NUM_THREADS' not in os.environ\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: theirs\n")
    proc = _pytest(tmp_path)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
    assert "--kv-backends" in _pytest(tmp_path, "--help").stdout


def test_in_this_checkout_a_kvcache_repro_from_elsewhere_is_refused(tmp_path):
    (tmp_path / "kvcache_repro" / "plugin").mkdir(parents=True)  # a checkout whose package is not the one imported
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    proc = _pytest(tmp_path)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "not from this checkout" in proc.stderr and "pip install -e ." in proc.stderr
