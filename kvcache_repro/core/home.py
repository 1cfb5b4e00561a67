"""Where the suite keeps what it builds once per machine, shared by every checkout: the pinned
environments (``venvs/``, keyed by the pins and the Python), the small real model expanded from
its GGUF (``models/``) and the workflow linter (``tools/``). ``KVQ_HOME`` moves it (default
``$XDG_CACHE_HOME/kvcache-repro``, else ``~/.cache/kvcache-repro``); ./kvq computes the same path."""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "KVQ_HOME"


def kvq_home() -> Path:
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kvcache-repro"
