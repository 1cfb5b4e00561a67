"""Expected behaviour of transformers' quantized cache, keyed by release range (of
transformers, or of torch / optimum-quanto / hqq where the behaviour is theirs:
``VersionRange.package``).

Ranges were found by measurement (``./kvq compat``, compat/RESULTS.md): an entry says
which releases showed its value, and a range ends at the first release that behaved
differently (bisected). The last 5.x range is open up to 6.0. Where the release is wrong,
the entry carries the upstream issue and its tests are xfail(strict=True). A release's
changed value accepted with ``./kvq compat --accept`` is stored in ACCEPTED_FILE and splits
its range there (``Accepted``, applied when this module loads).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import transformers
from packaging.version import Version

from kvcache_repro.backends.matrix import BackendSpec
from kvcache_repro.core import provenance
from kvcache_repro.core.atomic import write_atomic
from kvcache_repro.verdicts.tags import BEHAVIOUR_TAG, HARNESS_TAG


@dataclass(frozen=True)
class VersionRange:
    low: str  # inclusive
    high: str  # exclusive
    package: str = "transformers"  # whose releases: transformers, torch, optimum-quanto or hqq

    def contains(self, version: str) -> bool:
        return Version(self.low) <= Version(version) < Version(self.high)

    def __str__(self) -> str:
        return f">={self.low},<{self.high}" + (f" of {self.package}" if self.package != "transformers" else "")


def running(package: str, transformers_version: str | None = None) -> str:
    """The release of ``package`` a range is checked against: the given transformers
    version, or the installed release (torch's local build tag dropped: 2.13.0+cpu is 2.13.0)."""
    if package == "transformers":
        return transformers_version or transformers.__version__
    return provenance.installed(package).split("+")[0]


V457 = VersionRange("4.57.0", "4.58.0")  # the last 4.x line
V5 = VersionRange("5.0.0", "6.0.0")  # every 5.x; per-behaviour ranges below split it
SUPPORTED = (V457, V5)


class UnsupportedVersion(RuntimeError):
    pass


def current_range(version: str | None = None) -> VersionRange:
    version = running("transformers", version)
    for rng in SUPPORTED:
        if rng.contains(version):
            return rng
    raise UnsupportedVersion(
        f"transformers {version} is not supported by this suite (supported: "
        f"{', '.join(map(str, SUPPORTED))}); install the pinned version with "
        f"`pip install -r requirements.txt`, or add its expectations to kvcache_repro/verdicts/expectations.py"
    )


@dataclass(frozen=True)
class Expectation:
    value: str
    observed: str = ""  # the releases this value was measured on
    issue: str = ""  # upstream report, when the behaviour is a bug
    wrong: bool = False  # the release is wrong here: the test is xfail(strict=True)
    probe: str = ""  # regex for kvcache_repro/releases/probe.py's value, where it is not ``value``


@dataclass(frozen=True)
class Behaviour:
    """One behaviour's table: ``(range, value)`` pairs; a value is an Expectation or a
    dict of them (per family, per backend)."""

    name: str
    ranges: tuple[tuple[VersionRange, Any], ...]

    def entry(self, version: str | None = None) -> tuple[VersionRange, Any]:
        """The range holding the running release of its package (``version``: transformers')."""
        version = running("transformers", version)
        for rng, value in self.ranges:
            if rng.contains(running(rng.package, version)):
                return rng, value
        current_range(version)  # raises for an unsupported release
        raise UnsupportedVersion(f"{self.name}: no entry for transformers {version} "
                                 f"(ranges: {', '.join(str(r) for r, _ in self.ranges)})")

    def lookup(self, key: str | None = None, version: str | None = None) -> Expectation:
        _, value = self.entry(version)
        return value if key is None else value[key]

    def range_of(self, version: str | None = None) -> VersionRange:
        return self.entry(version)[0]


def differs(behaviour: Behaviour, key: str | None, observed: str, version: str | None = None,
            value: str | None = None) -> str:
    """The message for "transformers behaves differently from the table for this range";
    ``value``: the table value the observation amounts to, where it is one (what
    ``./kvq compat --accept`` stores; read back by ``accepted_from_message``)."""
    version = running("transformers", version)
    rng, _ = behaviour.entry(version)
    expected = behaviour.lookup(key, version)
    entry = behaviour.name + (f"[{key}]" if key else "")
    seen = f" (observed on {expected.observed})" if expected.observed else ""
    # the other packages' releases, so that one a quantizer or torch release changed is not
    # read as the range package's (a compat run swaps any of them)
    others = [f"{name} {v}" for name, v in provenance.package_versions().items() if name != rng.package]
    stack = f" (with {', '.join(others)})" if others else ""
    found = f", found {value!r}" if value is not None else ""  # first: a stored run keeps 600 characters
    return (f"{BEHAVIOUR_TAG} {rng.package} {running(rng.package, version)} behaves differently from the "
            f"table for {rng}: {entry} expects {expected.value!r}{seen}{found}; observed here: {observed}{stack}. "
            "Record it in kvcache_repro/verdicts/expectations.py if intended (one release: ./kvq compat --accept), "
            "else report upstream with this test as reproduction.")


def pinned_reason(behaviour: Behaviour, key: str | None, expectation: Expectation) -> str:
    """The xfail reason of a pinned bug: names the entry, so a fix (an XPASS) can be accepted."""
    return f"{behaviour.name}{f'[{key}]' if key else ''} pinned as wrong: {expectation.issue}"


def harness_gap(what: str, version: str | None = None) -> str:
    """The message for "the harness cannot drive this release" (a skip, never a rejection)."""
    return f"{HARNESS_TAG} the harness cannot drive transformers {running('transformers', version)}: {what}"


# ---- the tables ------------------------------------------------------------------------
# Boundaries: the first release showing the newer behaviour, bisected with
# `./kvq compat --probe` (compat/probes/, compat/RESULTS.md "Behaviours per release").
RECURRENT_PARTIAL = "5.4.0"  # RecurrentGemma's attention layer quantized (before: none)
SLIDING_REJECTED = "5.14.0"  # sliding-window/recurrent families rejected from here on
CONFIG_UNTOUCHED = "5.19.0"  # generate() stops popping 'backend' out of cache_config
BEAM_REORDERED = "5.19.0"  # reorder_cache reaches the quantized store
# The releases each part of 5.x was observed on.
SEEN_5_0, SEEN_5_4 = "5.0.0, 5.1.0, 5.2.0, 5.3.0", "5.4.0, 5.5.4, 5.10.4, 5.13.1"
SEEN_5_14 = "5.14.0, 5.14.1, 5.15.1, 5.16.1, 5.17.0, 5.18.0"
SEEN_5_19 = "5.19.0, 5.20.2, 5.21.1, 5.22.2, 5.23.0, 5.24.0"
SEEN_BEFORE_5_19 = f"{SEEN_5_0}, {SEEN_5_4}, {SEEN_5_14}"

# Family support with every quantized backend: "quantizes" (every layer holds quantized
# storage), "partial" (only the attention layers do: recurrent ones keep no K/V),
# "rejected" (transformers' documented ValueError: non-full-attention layers);
# "quantizes" + wrong: runs, but not as a quantized cache should (pinned as a bug).
_FULL_ATTENTION = ("llama", "gemma", "stablelm", "dbrx", "cohere", "olmo")


def _families(observed: str, **special: Expectation) -> dict[str, Expectation]:
    return {**{f: Expectation("quantizes", observed) for f in _FULL_ATTENTION}, **special}


_SLIDING_IGNORED = ("{v} ignores the sliding window when quantizing: sliding layers become full quantized ones and "
                    "the cache outgrows the unquantized sliding one (16384 vs 15376 bytes for the tiny config, 5.10.4); "
                    "later releases reject such models instead")
_NO_LAYER = r"runs, 0 of \d+ layers quantized"

FAMILY_SUPPORT = Behaviour("FAMILY_SUPPORT", (
    (V457, _families(
        "4.57.6",  # recurrentgemma accepted, but its recurrent/sliding layers hold no quantized storage
        recurrentgemma=Expectation("quantizes", "4.57.6", "silent no-op on 4.57; 5.x rejects it instead",
                                   wrong=True, probe=_NO_LAYER),
        mistral=Expectation("quantizes", "4.57.6", _SLIDING_IGNORED.format(v="4.57"), wrong=True))),
    (VersionRange("5.0.0", RECURRENT_PARTIAL), _families(
        SEEN_5_0,  # on 5.0.0 generate returns no cache for recurrentgemma at all: a [harness] skip
        recurrentgemma=Expectation("quantizes", "5.1.0, 5.2.0, 5.3.0", "silent no-op: no layer of "
                                   "RecurrentGemma holds quantized storage", wrong=True, probe=_NO_LAYER),
        mistral=Expectation("quantizes", SEEN_5_0, _SLIDING_IGNORED.format(v="early 5.x"), wrong=True))),
    (VersionRange(RECURRENT_PARTIAL, SLIDING_REJECTED), _families(
        SEEN_5_4,  # recurrentgemma: its one attention layer quantized, the two recurrent ones keep no K/V
        recurrentgemma=Expectation("partial", SEEN_5_4, probe=r"runs, [1-9]\d* of \d+ layers quantized"),
        mistral=Expectation("quantizes", SEEN_5_4, _SLIDING_IGNORED.format(v="early 5.x"), wrong=True))),
    (VersionRange(SLIDING_REJECTED, "6.0.0"), _families(
        f"{SEEN_5_14}, {SEEN_5_19}",  # recurrent + sliding-window layers; sliding-window layers
        recurrentgemma=Expectation("rejected", f"{SEEN_5_14}, {SEEN_5_19}"),
        mistral=Expectation("rejected", f"{SEEN_5_14}, {SEEN_5_19}"))),
))

# Batch invariance: does a row generate the same in a batch of 4 as alone? "exact" (same
# tokens, logits within 1e-5), "tokens" (same tokens, logits within 1e-2), "no" (tokens
# differ). quanto axis 0 groups within a row; hqq axis 0 groups elements n/G apart, i.e.
# across rows; hqq axis 1 groups within a row, but hqq's proximal optimizer stops on the
# tensor-wide mean error (hqq/core/optimize.py), so other rows change how long each group
# is optimized: 4-bit logits moved by 1.5e-3, 2- and 1-bit tokens changed. fp8's single
# per-tensor scale spans the batch (fp8 exists from 5.21.0 on; before, its tests skip).
_INVARIANCE = {
    "none": "exact", "quanto2": "exact", "quanto4": "exact",
    "hqq1": "no", "hqq2": "no", "hqq3": "no", "hqq4": "no", "hqq8": "no",
    "hqq1-axis1": "no", "hqq2-axis1": "no", "hqq4-axis1": "tokens", "hqq8-axis1": "tokens",
}


def _invariance(observed: str, **extra: str) -> dict[str, Expectation]:
    return {k: Expectation(v, observed) for k, v in {**_INVARIANCE, **extra}.items()}


BATCH_INVARIANCE = Behaviour("BATCH_INVARIANCE", (
    (V457, _invariance("4.57.6")),
    (V5, {**_invariance("5.0.0, 5.5.4, 5.10.4, 5.14.0, 5.17.0, 5.19.0, 5.20.2, 5.24.0"),
          "fp8": Expectation("no", "5.24.0")}),  # fp8 exists from 5.21.0
))

_POPS = ("transformers #48700: generate() pops 'backend' out of the caller's cache_config (and adds 'config'); "
         "a reused dict silently switches to quanto")
CACHE_CONFIG_UNTOUCHED = Behaviour("CACHE_CONFIG_UNTOUCHED", (
    (V457, Expectation("yes", "4.57.6", _POPS, wrong=True)),
    (VersionRange("5.0.0", CONFIG_UNTOUCHED), Expectation("yes", SEEN_BEFORE_5_19, _POPS, wrong=True)),
    (VersionRange(CONFIG_UNTOUCHED, "6.0.0"), Expectation("yes", SEEN_5_19)),
))

# Beam search through a near-lossless quantized cache (hqq 8-bit) picks the same sequences
# as through the unquantized one: reorder_cache must reorder the quantized store too.
_STALE = ("transformers #48700: QuantizedLayer.reorder_cache reorders only the residual, the quantized store "
          "keeps the old beam order")
BEAM_SEARCH_MATCHES = Behaviour("BEAM_SEARCH_MATCHES", (
    (V457, Expectation("yes", "4.57.6", _STALE, wrong=True)),
    (VersionRange("5.0.0", BEAM_REORDERED), Expectation("yes", SEEN_BEFORE_5_19, _STALE, wrong=True)),
    (VersionRange(BEAM_REORDERED, "6.0.0"), Expectation("yes", SEEN_5_19)),  # 5.24: at the next update
))

# Does a forward of several tokens (a divisor of residual_length) through a quantized layer
# flush its residual after the same tokens as one token per forward ("same") or later? Up
# to 5.19 QuantizedLayer.update flushes on `residual + 1 >= R`: a 16-token forward overfills
# the residual (at R 64 flushes every 80 tokens: 128, 208, 288 against 128, 192, 256);
# 5.20.0 flushes on `residual + new >= R`. The accuracy tables use 16-token forwards only
# where the flushes are the same (quality.effective_step).
MULTI_TOKEN_FLUSH = Behaviour("MULTI_TOKEN_FLUSH", (
    (V457, Expectation("later", "4.57.6")),
    (VersionRange("5.0.0", "5.20.0"), Expectation("later", "5.0.0, 5.17.0, 5.19.0")),
    (VersionRange("5.20.0", "6.0.0"), Expectation("same", "5.20.0, 5.20.2, 5.24.0")),
))

# torch's: a float32 -> float8_e4m3fn cast beyond 448 (by more than half a step, > 464)
# gives NaN up to 2.12.x and saturates to 448 from 2.13.0 (CPU; 2.12.1 -> 2.13.0 are
# consecutive releases: the boundary is exact). transformers' fp8 layer freezes its scale
# at the prompt's amplitude, so there a louder decoded token becomes NaN: fp8's logits are
# non-finite (test_accuracy.py::test_logits_are_finite[fp8] fails, named).
FP8_SATURATES = "2.13.0"
FP8_CAST_OVERFLOW = Behaviour("FP8_CAST_OVERFLOW", (
    (VersionRange("2.0.0", FP8_SATURATES, "torch"), Expectation("nan", "2.11.0, 2.12.1")),
    (VersionRange(FP8_SATURATES, "3.0.0", "torch"), Expectation("saturates", "2.13.0, 2.14.1")),
))

# hqq's: does ``Quantizer.quantize`` run HQQ's proximal optimizer unless told otherwise?
# transformers' HQQQuantizedLayer never passes ``optimize``, so below hqq 0.2.7 (default
# False) its "HQQ" cache is plain min-max rounding: hqq4-axis1 KL 0.09669 = quanto4's,
# axis 1 exactly batch-invariant (no optimizer to couple the rows).
HQQ_OPTIMIZES_BY_DEFAULT = "0.2.7"
HQQ_OPTIMIZE_DEFAULT = Behaviour("HQQ_OPTIMIZE_DEFAULT", (
    (VersionRange("0.2.0", HQQ_OPTIMIZES_BY_DEFAULT, "hqq"), Expectation("no", "0.2.5, 0.2.6")),
    (VersionRange(HQQ_OPTIMIZES_BY_DEFAULT, "1.0.0", "hqq"), Expectation("yes", "0.2.7, 0.2.7.post1, 0.2.8.post1")),
))

BEHAVIOURS = (FAMILY_SUPPORT, BATCH_INVARIANCE, CACHE_CONFIG_UNTOUCHED, BEAM_SEARCH_MATCHES, MULTI_TOKEN_FLUSH,
              FP8_CAST_OVERFLOW, HQQ_OPTIMIZE_DEFAULT)


def multi_token_flush(version: str | None = None) -> str:
    return MULTI_TOKEN_FLUSH.lookup(version=version).value


def family_support(family: str, version: str | None = None) -> Expectation:
    return FAMILY_SUPPORT.lookup(family, version)


def batch_invariance(spec: BackendSpec, version: str | None = None) -> str:
    kind = spec.kind  # each group within one row: only hqq's optimizer (its tensor-wide stop) couples rows
    if (kind.package == "hqq" and spec.axis == kind.row_axis
            and HQQ_OPTIMIZE_DEFAULT.lookup(version=version).value == "no"):
        return "exact"
    return BATCH_INVARIANCE.lookup(spec.name, version).value


# ---- values accepted for one release (./kvq compat --accept) ----------------------------
ACCEPTED_FILE = Path(__file__).resolve().parents[2] / "baselines" / "expectations.json"
ACCEPT_FIX = f"restore it from git (git checkout baselines/{ACCEPTED_FILE.name}) or delete the bad record"
ACCEPTED_ERROR = ""  # why ACCEPTED_FILE could not be applied (the plugin stops the run with it)


@dataclass(frozen=True)
class Accepted:
    """From ``release`` of ``package`` on, ``behaviour[key]`` is ``value`` (``wrong`` False:
    a pinned bug no longer shows): its range is split at that release."""

    behaviour: str
    key: str | None
    package: str
    release: str
    value: str
    produced_by: dict


def amend(behaviour: Behaviour, a: Accepted) -> Behaviour:
    """The table with the range holding ``a.release`` split there, the upper part holding ``a.value``."""
    out, hit = [], False
    for rng, table in behaviour.ranges:
        if rng.package != a.package or not rng.contains(a.release):
            out.append((rng, table))
            continue
        if a.key is not None and a.key not in table:
            raise ValueError(f"{ACCEPTED_FILE}: {a.behaviour} has no key {a.key!r} for {rng}; {ACCEPT_FIX}")
        old = table if a.key is None else table[a.key]
        later = [v for v in old.observed.split(",") if v.strip() and Version(v.strip()) >= Version(a.release)]
        if later and old.value != a.value:
            raise ValueError(f"{a.behaviour}{f'[{a.key}]' if a.key else ''}: {rng} holds {old.value!r}, observed on "
                             f"{', '.join(v.strip() for v in later)}, at or above {a.package} {a.release}: bisect "
                             "(./kvq compat --probe) and write the range in verdicts/expectations.py")
        hit, new = True, Expectation(a.value, a.release)
        if Version(rng.low) != Version(a.release):
            out.append((VersionRange(rng.low, a.release, rng.package), table))
        out.append((VersionRange(a.release, rng.high, rng.package), new if a.key is None else {**table, a.key: new}))
    if not hit:
        raise ValueError(f"{ACCEPTED_FILE}: no range of {a.behaviour} holds {a.package} {a.release}; {ACCEPT_FIX}")
    return replace(behaviour, ranges=tuple(out))


def load_accepted(path: Path | None = None) -> list[Accepted]:
    path = path or ACCEPTED_FILE
    if not path.exists():
        return []
    try:
        return [Accepted(**record) for record in json.loads(path.read_text())["accepted"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a list of accepted expectations ({error}); {ACCEPT_FIX}") from None


def amended(records: list[Accepted], tables: tuple[Behaviour, ...] | None = None) -> dict[str, Behaviour]:
    """The reviewed tables with ``records`` applied, by name (a record that does not apply raises)."""
    by_name = {b.name: b for b in (tables or _REVIEWED)}
    for a in sorted(records, key=lambda a: (a.behaviour, a.key or "", a.package, Version(a.release))):
        if a.behaviour not in by_name:
            raise ValueError(f"{ACCEPTED_FILE}: unknown behaviour {a.behaviour!r} (known: {', '.join(by_name)}); "
                             f"{ACCEPT_FIX}")
        by_name[a.behaviour] = amend(by_name[a.behaviour], a)
    return by_name


def check_accepted(records: list[Accepted]) -> None:
    """Each record is a value its table knows (a value outside it could not make a test pass)
    and, with the stored ones, amends the reviewed tables; ValueError naming the problem."""
    for a in records:
        values = {e.value for _, t in {b.name: b for b in _REVIEWED}.get(a.behaviour, Behaviour("", ())).ranges
                  for e in (t.values() if isinstance(t, dict) else [t])}
        if a.value not in values:
            raise ValueError(f"{a.behaviour}: {a.value!r} is no value of its table ({', '.join(sorted(values))})")
    stored = {(a.behaviour, a.key, a.package, a.release): a for a in load_accepted()}
    amended([*stored.values(), *records])


def accept(records: list[Accepted], path: Path | None = None) -> list[str]:
    """Store ``records`` (replacing a stored one of the same behaviour, key, package and
    release) once all of them amend the reviewed tables; what was written."""
    path = path or ACCEPTED_FILE
    stored = {(a.behaviour, a.key, a.package, a.release): a for a in load_accepted(path)}
    stored.update({(a.behaviour, a.key, a.package, a.release): a for a in records})
    ordered = sorted(stored.values(), key=lambda a: (a.behaviour, a.key or "", a.package, Version(a.release)))
    amended(ordered)  # nothing that does not apply is written
    write_atomic(path, json.dumps({"description": "expectations accepted for one release at a time "
                                   "(./kvq compat --accept); each splits its range at that release",
                                   "accepted": [asdict(a) for a in ordered]}, indent=1) + "\n")
    return [f"{a.behaviour}{f'[{a.key}]' if a.key else ''}: {a.value!r} from {a.package} {a.release} on" for a in records]


_MISS = re.compile(r"\[behaviour\] (\S+) (\S+) behaves differently from the table for [^:]*: (\w+)(?:\[([^\]]+)\])? "
                   r"expects '[^']*'(?: \(observed on [^)]*\))?, found '([^']*)';")
_FIXED = re.compile(r"\[XPASS\(strict\)\] (\w+)(?:\[([^\]]+)\])? pinned as wrong")


def accepted_from_message(message: str, versions: dict[str, str], produced_by: dict) -> Accepted | None:
    """What a behaviour failure of a stored run asks to accept, or None when it is not a table
    value (an observation outside the table's vocabulary is for a person to read)."""
    if m := _MISS.search(message):
        return Accepted(m.group(3), m.group(4), m.group(1), m.group(2), m.group(5), produced_by)
    if (m := _FIXED.search(message)) and (behaviour := {b.name: b for b in BEHAVIOURS}.get(m.group(1))):
        package = behaviour.ranges[-1][0].package
        release = versions.get(package, "").split("+")[0]
        if release:
            expected = behaviour.lookup(m.group(2), release if package == "transformers" else None)
            return Accepted(behaviour.name, m.group(2), package, release, expected.value, produced_by)
    return None


_REVIEWED = BEHAVIOURS  # the tables as written above; the module's names hold them amended
try:
    globals().update(amended(load_accepted()))
except ValueError as _error:  # the reviewed tables stay; plugin.options stops the run with this
    ACCEPTED_ERROR = str(_error)
BEHAVIOURS = tuple(globals()[b.name] for b in _REVIEWED)
