"""The machine record of baselines and results.json says which CPU path torch really took (a
number measured under ATen's default path must not pass for AVX2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_record_names_the_path_torch_takes_and_the_knobs_set():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", "import json; from kvcache_repro.core.provenance import machine; "
                          "print(json.dumps(machine()))"], env=env, capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    assert m["torch_capability"] == "DEFAULT"
    assert m["env"] == {"ATEN_CPU_CAPABILITY": "default"}
    assert m["cpu"] and m["cores"] >= 1
