"""Per-release ranges of a baseline entry: ``">=LOW,<HIGH"`` of one package's releases
(PEP 440), whether a release lies in one, and the value an entry holds for such a range
(``ReleaseValue``). Stdlib only (plus ``packaging``), like the baseline file that holds them
(verdicts/baseline_file.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

# A per-release range as written in a baseline file: ">=LOW,<HIGH" (PEP 440 versions).
_RANGE = re.compile(r"^>=([^,<>=\s]+),<([^,<>=\s]+)$")

# How to re-record a per-release value (kvcache_repro/verdicts/release_baselines.py).
RANGE_COMMAND = "python -m kvcache_repro release-baselines SCENARIO RELEASE=RESULTS_DIR ... --write"
RANGE_HINT = (f"re-measure the releases of that range (`python -m kvcache_repro experiment --in-process` with each "
              f"release's interpreter) and record them with `{RANGE_COMMAND}` (verdicts/release_baselines.py); "
              "one release's changed value: `./kvq compat --accept SPEC`")
RANGE_FIX = ("write it as \">=LOW,<HIGH\" with LOW < HIGH (transformers versions, the first release "
             "showing the value and the first one not showing it), with the releases it was measured on "
             "in 'observed_on', or delete the range to compare against the entry's own ratio")


def parse_range(text) -> tuple[Version, Version]:
    """``">=5.0.0,<5.19.0"`` -> (low, high); ValueError saying what is wrong otherwise."""
    m = _RANGE.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"range {text!r} is not of the form \">=LOW,<HIGH\"")
    try:
        low, high = Version(m.group(1)), Version(m.group(2))
    except InvalidVersion as exc:
        raise ValueError(f"range {text!r}: {exc}") from None
    if not low < high:
        raise ValueError(f"range {text!r} is empty (LOW must be below HIGH)")
    return low, high


def below(v: Version, high: Version) -> bool:
    """PEP 440's ``<HIGH``: HIGH's own pre- and dev releases (5.26.1rc1) are not below it."""
    return v < high and not (v.is_prerelease and not high.is_prerelease and Version(v.base_version) == high)


def in_range(releases: str, version: str) -> bool:
    low, high = parse_range(releases)
    v = Version(version)
    return low <= v and below(v, high)


@dataclass(frozen=True)
class ReleaseValue:
    """An entry's value for a range of releases of one package (``package``, default
    transformers) other than the pinned one, the other packages pinned."""

    releases: str  # ">=LOW,<HIGH"
    ratio: float
    tolerance: float
    observed_on: tuple[str, ...]  # the releases this ratio was measured on (all in the range)
    produced_by: dict
    package: str = "transformers"

    def describe(self) -> str:
        return f"{self.package} {self.releases} (observed on {', '.join(self.observed_on)})"

    def to_json(self) -> dict:
        out = {"releases": self.releases, "ratio": self.ratio, "tolerance": self.tolerance,
               "observed_on": list(self.observed_on), "produced_by": self.produced_by}
        if self.package != "transformers":  # files of transformers ranges keep their format
            out["package"] = self.package
        return out
