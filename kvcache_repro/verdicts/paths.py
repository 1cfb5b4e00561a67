"""Which baseline file a scenario's run compares with and which one an update writes:
baselines/<name>.json, a user's model's under baselines/models/, a CUDA card's own
baselines/<name>--<card>.json beside the scenario's prediction."""
from __future__ import annotations

import re
from pathlib import Path

from kvcache_repro.core import provenance
from kvcache_repro.measure import scenarios
from kvcache_repro.verdicts import baseline_file


def _scenario(name: str):
    try:
        return scenarios.get(name)
    except scenarios.SelectionError:  # a name no scenario has: its (absent) file says "missing"
        return None


def baseline_path(scenario: str) -> Path:
    """baselines/<name>.json (a user's model: models/<digest of its key>.json)."""
    s = _scenario(scenario)
    return baseline_file.BASELINE_DIR / f"{(s.baseline_name if s is not None else None) or scenario}.json"


def card_path(scenario: str, card: str) -> Path:
    """A built-in CUDA scenario's baselines measured on one kind of card."""
    return baseline_file.BASELINE_DIR / f"{scenario}--{re.sub(r'[^A-Za-z0-9.]+', '-', card).strip('-')}.json"


def _per_card(scenario: str) -> bool:
    s = _scenario(scenario)  # a --model file is keyed by its device already
    return s is not None and s.device == "cuda" and s.baseline_key is None


def compared_files(scenario: str) -> list[Path]:
    """Where a run's entries are looked up, first holder wins: on CUDA this card's own file (what
    it measured), then the scenario's (the prediction, or what it holds)."""
    own = card_path(scenario, provenance.device_name("cuda")) if _per_card(scenario) else None
    return [p for p in (own, baseline_path(scenario)) if p is not None]


def compared_path(scenario: str) -> Path:
    """The first of compared_files that exists (the scenario's when none does)."""
    return next((p for p in compared_files(scenario) if p.exists()), baseline_path(scenario))


def recorded_path(scenario: str) -> Path:
    """The file an update writes: on CUDA the card's own (card_path)."""
    return card_path(scenario, provenance.device_name("cuda")) if _per_card(scenario) else baseline_path(scenario)
