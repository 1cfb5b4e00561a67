"""Which baseline file a scenario's run compares with and which one an update writes:
baselines/<name>.json, a user's model's under baselines/models/, a CUDA card's own
baselines/<name>--<card>.json beside the scenario's prediction."""
from __future__ import annotations

from pathlib import Path

from kvcache_repro.core import provenance
from kvcache_repro.measure import scenarios
from kvcache_repro.verdicts import baseline_file


def baseline_path(scenario: str) -> Path:
    """baselines/<name>.json; a user's model: baselines/models/<name>.json, named by a
    digest of what its numbers depend on (scenarios.model_scenario)."""
    try:
        stored_as = scenarios.get(scenario).baseline_name or scenario
    except scenarios.SelectionError:  # a name no scenario has: its (absent) file says "missing"
        stored_as = scenario
    return baseline_file.BASELINE_DIR / f"{stored_as}.json"


def card_path(scenario: str, card: str) -> Path:
    """A built-in CUDA scenario's baselines measured on one kind of card:
    baselines/<name>--<card>.json. Its own file holds the CPU's prediction (or, for seed,
    the seed's figures), which no card's measurement overwrites."""
    import re

    return baseline_file.BASELINE_DIR / f"{scenario}--{re.sub(r'[^A-Za-z0-9.]+', '-', card).strip('-')}.json"


def _per_card(scenario: str) -> bool:
    try:
        s = scenarios.get(scenario)
    except scenarios.SelectionError:
        return False
    return s.device == "cuda" and s.baseline_key is None  # a --model file is keyed by its device already


def compared_path(scenario: str) -> Path:
    """The file a run compares with: on CUDA the one measured on this kind of card when
    there is one, else the scenario's own (the prediction)."""
    if _per_card(scenario):
        path = card_path(scenario, provenance.device_name("cuda"))
        if path.exists():
            return path
    return baseline_path(scenario)


def recorded_path(scenario: str) -> Path:
    """The file an update writes: on CUDA the card's own (card_path)."""
    return card_path(scenario, provenance.device_name("cuda")) if _per_card(scenario) else baseline_path(scenario)
