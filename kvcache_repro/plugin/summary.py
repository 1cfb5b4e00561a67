"""The end-of-run summary over kinds.KINDS: tables, drift, the claims table and file, and
--kv-update-baselines and --kv-accept-release. Under xdist each worker hands its report to the controller."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from dataclasses import asdict

import pytest

from kvcache_repro.plugin import state
from kvcache_repro.plugin.kinds import KINDS
from kvcache_repro.verdicts import comparison

@pytest.fixture
def claim_verdict(request):
    """``claim_verdict(result)``: record a claims.ClaimResult for the claims table, then
    fail unless its verdict is the one expected on this setup."""

    def check(result):
        record_claim(request.config, result)
        assert result.verdict == result.expected, result.message()

    return check


def record_claim(config, result) -> None:
    """Keep a claims.ClaimResult for the claims table (claim_verdict does, and asserts)."""
    config.stash.setdefault(state.CLAIMS, []).append(result)


def session_report(config) -> dict:
    """What this process measured, as text: sections of the summary and the claim results."""
    from kvcache_repro.core import provenance
    from kvcache_repro.verdicts import comparison

    sections: dict[str, list[str]] = {}
    drift = []  # (baseline file, verdicts) of everything compared this session
    for kind in KINDS:
        for key, result in state.results(config, kind.name).items():
            sections.setdefault(kind.title, []).extend(kind.report(key, result))
            drift.append(kind.compared(key, result))
    versions = provenance.package_versions()
    lines = [line for path, verdicts in drift for line in comparison.drift_lines(path, verdicts, versions)]
    if lines:
        sections["Drift against baselines recorded with other package versions"] = lines
    return {"sections": sections, "claims": [asdict(r) for r in config.stash.get(state.CLAIMS, [])]}


def pytest_sessionstart(session):
    session.config.stash[state.STARTED] = time.monotonic()


class _Timer:
    """Seconds per test file, in the process that prints (xdist: the controller sees every report)."""

    def __init__(self, config):
        self.config = config

    def pytest_runtest_logreport(self, report):
        group = report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        timings = self.config.stash.setdefault(state.TIMINGS, {})
        timings[group] = timings.get(group, 0.0) + report.duration


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Timer(config), "kvq-timer")


def pytest_sessionfinish(session):
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: the controller prints and writes
        config.workeroutput["kvq_report"] = json.dumps(session_report(config), default=str)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: keep each worker's report for the terminal summary."""
    text = getattr(node, "workeroutput", {}).get("kvq_report")
    if text:
        node.config.stash.setdefault(state.WORKER_REPORTS, []).append(json.loads(text))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The tables of every kind measured (in every worker), the claims table, baseline updates."""
    from kvcache_repro.verdicts import claims

    reports = config.stash.get(state.WORKER_REPORTS, None) or [session_report(config)]
    titles = list(dict.fromkeys(t for r in reports for t in r["sections"]))
    for title in titles:
        terminalreporter.section(title)
        for r in reports:
            for line in r["sections"].get(title, []):
                terminalreporter.write_line(line)
    claim_results = claims.in_table_order([claims.ClaimResult(**d) for r in reports for d in r["claims"]])
    if claim_results:
        _write_claims(terminalreporter, config, claims, claim_results)
    if config.getoption("--kv-update-baselines"):
        update_baselines(terminalreporter, config)
    if config.getoption("--kv-accept-release"):
        accept_release(terminalreporter, config)
    _timings(terminalreporter, config, exitstatus)


def _timings(terminalreporter, config, exitstatus):
    """The run's seconds per test file beside the recorded ones; kept in results/timings/."""
    from kvcache_repro.core import provenance, timings

    seconds = dict(config.stash.get(state.TIMINGS, {}))
    if not seconds or not state.suite_run(config):
        return
    seconds[timings.TOTAL] = time.monotonic() - config.stash.get(state.STARTED, time.monotonic())
    mark, keyword, paths = config.getoption("-m") or "", config.getoption("-k") or "", config.args
    whole = not keyword and all(Path(p).resolve() == config.rootpath / "tests" for p in paths)
    what = "tier" if mark == "not gpu" and whole else " ".join(
        ["pytest", *(["-m", repr(mark)] if mark else []), *(["-k", repr(keyword)] if keyword else []),
         *([] if whole else [f"{len(paths)} path{'s' * (len(paths) != 1)}"])])
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        what += f" ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}"
    workers = getattr(config.option, "numprocesses", None) or 0
    produced = provenance.produced_by("CPU", "pytest --kv-record-timings", {
        "workers": workers, "selected": keyword or "all", "tests": _count(terminalreporter)})
    terminalreporter.section("Time per test file")
    record = config.getoption("--kv-record-timings")
    for line in timings.keep(what, seconds, produced, record and exitstatus == 0):
        terminalreporter.write_line(line)
    if record and exitstatus != 0:
        terminalreporter.write_line("timings NOT recorded: the run did not pass (pytest exit "
                                    f"{int(exitstatus)}); a failed or cut run's times are not the suite's")


def _count(terminalreporter) -> int:
    return sum(len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "skipped", "xfailed", "xpassed"))


def _write_claims(terminalreporter, config, claims, claim_results):
    import torch

    from kvcache_repro.core import provenance
    from kvcache_repro.gpu import device_run

    terminalreporter.section("The seed's claims on this setup")
    terminalreporter.write_line(claims.table(claim_results))
    produced = provenance.produced_by(provenance.device_label("cuda" if torch.cuda.is_available() else "cpu"), None,
                                      with_machine=False)
    # ./kvq device-run's pytest step: beside its results (SUMMARY.md shows it), not in the checkout
    out = claims.write(device_run.stored_runs_dir() or config.rootpath / "results", claim_results, produced)
    terminalreporter.write_line(f"claims table written to {', '.join(str(p) for p in out)}")


def update_baselines(terminalreporter, config):
    """In one process (options.pytest_configure refuses xdist): a band miss is what an update
    is for; any other failure means the run is not trustworthy enough to become a baseline."""
    failed = bool(config.stash.get(state.FAILED, set()) - comparison.BAND_TESTS)
    reset = config.getoption("--kv-reset-tolerances")
    for kind in KINDS:
        for key, result in state.results(config, kind.name).items():
            what = f"{kind.name} {'-'.join(map(str, key))}"
            try:
                lines = kind.update(key, result, failed, reset)
            except ValueError as error:  # BaselineError: refused, the file is untouched
                terminalreporter.write_line(f"baselines {what} NOT updated: {error}")
                continue
            for line in lines:
                terminalreporter.write_line(f"baseline {what}: {line}")


def accept_release(terminalreporter, config):
    """Each band miss stored as the installed release's value (baseline_update.accept); any
    other failure, or a verdict that is not a band miss (missing, unmeasured, non-finite),
    refuses the whole run: only a changed value is accepted."""
    from kvcache_repro.core import provenance
    from kvcache_repro.verdicts import baseline_update

    package = config.getoption("--kv-accept-release")
    release = provenance.installed(package).split("+")[0]
    write = terminalreporter.write_line
    others = config.stash.get(state.FAILED, set()) - comparison.BAND_TESTS
    found = [(kind, path, v) for kind in KINDS for key, result in state.results(config, kind.name).items()
             for path, verdicts in [kind.compared(key, result)] for v in verdicts if not v.passed]
    refused = [f"{v.key} ({v.status})" for _, _, v in found if v.status not in ("regression", "improvement")]
    if others or refused or not found:
        why = (f"other tests failed: {', '.join(sorted(others))}" if others else
               f"not a changed value: {', '.join(refused)}" if refused else "no band miss to accept")
        write(f"kv-accept-release: nothing written for {package} {release}: {why}")
        return
    produced = provenance.produced_by(provenance.device_label("cpu"), "./kvq compat --accept")
    for path in dict.fromkeys(p for _, p, _ in found):
        moved = {v.key: v.measured for _, p, v in found if p == path}
        try:
            lines = baseline_update.accept(path, moved, package, release, produced)
        except ValueError as error:  # BaselineError: refused, the file is untouched
            write(f"kv-accept-release: {path} NOT updated: {error}")
            continue
        for line in lines:
            write(f"kv-accept-release: {path}: {line}")
