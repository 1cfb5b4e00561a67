"""``nox -s compat -- 5.17.0 5.24.0``: the same as ``./kvq compat 5.17.0 5.24.0`` - the CPU
tier's version-sensitive groups against each transformers release, each in its own cached
environment (kvcache_repro/releases/compat_envs.py: a thin venv per release over one base with the
pins), one JSON per release in compat/runs/, and compat/RESULTS.md rewritten: the matrix
(releases as rows, test groups as columns) and a section per release. A release that
cannot install is a row, not a crash. See the README, "Checking a new transformers release"."""
from __future__ import annotations

import nox

nox.options.sessions = ["compat"]


@nox.session(venv_backend="none")
def compat(session: nox.Session) -> None:
    # the environments are cached per release by the runner itself (nox's one reusable
    # venv per session would reinstall transformers on every switch of release)
    session.run("python", "-m", "kvcache_repro", "compat", *session.posargs)
