"""The plugin's session state, in ``config.stash``: one key per thing a hook keeps."""
from __future__ import annotations

import pytest

SELECTION = pytest.StashKey[tuple]()  # (families, backends, batch sizes), validated once
RESULTS = pytest.StashKey[dict]()  # kind name -> {key: what that kind measured}
CLAIMS = pytest.StashKey[list]()  # claims.ClaimResult recorded by claim_verdict
FAILED = pytest.StashKey[set]()  # names of the tests that failed
WORKER_REPORTS = pytest.StashKey[list]()  # xdist controller: each worker's report
QUANTO_NOTE = pytest.StashKey[str]()
SPEED_DIR = pytest.StashKey[str]()  # xdist controller: where the speed measured ahead is handed over
SPEED_PREMEASURED = pytest.StashKey[bool]()
TIMINGS = pytest.StashKey[dict]()  # test file -> seconds of setup + call + teardown (controller)
STARTED = pytest.StashKey[float]()  # the session's start, time.monotonic()


def results(config, kind: str) -> dict:
    return config.stash.setdefault(RESULTS, {}).setdefault(kind, {})


def suite_run(config) -> bool:
    """Whether this pytest runs the suite's own checkout. Installed (the pytest11 entry point),
    the plugin is loaded in every pytest of that environment: elsewhere it only adds options."""
    return (config.rootpath / "kvcache_repro" / "plugin").is_dir()


def xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")
