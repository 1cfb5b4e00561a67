"""The seed's claims: one function per claim that turns measurements into numbers and a
verdict, the verdicts expected on this project's setups, and the claims table (terminal,
Markdown, JSON) every run writes. A verdict is "holds" or "does not hold" only by a margin
wider than the measurement's own spread, else "not distinguishable" (stable, never a coin
toss). Tests compare it with ``EXPECTED``, measured on a 2-core CPU (docs/seed-claims.md).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "not distinguishable"

# claim id -> the claim as the seed puts it
CLAIMS = {
    "saves_little_for_one_short_prompt":
        "quantizing the KV cache saves little memory for one prompt with few output tokens",
    "saves_a_lot_at_200_prompts":
        "with 200 prompts generating at once, quantizing the KV cache saves a lot of memory",
    "quanto_uses_less_memory_than_hqq":
        "at batch 200 quanto needs less memory than HQQ (seed: 18.94 vs 29.34 GB reserved)",
    "hqq_more_accurate_than_quanto": "HQQ is more accurate than quanto (at equal nbits)",
    "hqq_slower_than_quanto": "HQQ is slower than quanto",
    "quantization_slows_decoding": "quantizing the KV cache reduces inference speed",
}

# (claim, setup) -> verdict measured on the reference machine; a setup missing here has no
# expectation yet: its test fails and says which verdict it measured. cpu-deep: peak quanto4
# 0.539, hqq4 0.720 of none; cpu (the main job, 48 rows): 0.686, 0.732. core-4bit: KL 0.060 vs 0.097, perplexity 1.086 vs 1.072. hqq
# axis 0 re-groups the whole history across batch rows at every flush: it loses at the seed's
# 1,024 decoded tokens; axis 1 (grouped like quanto's axis 0) wins at both lengths.
EXPECTED: dict[tuple[str, str], str] = {(claim, setup): verdict for claim, by_setup in {
    "saves_little_for_one_short_prompt": {"cpu-short": HOLDS},
    "saves_a_lot_at_200_prompts": {"cpu-tiny": FAILS, "cpu-deep": HOLDS, "cpu": HOLDS, "seed-geometry": HOLDS},
    "quanto_uses_less_memory_than_hqq": {"cpu-tiny": HOLDS, "cpu-deep": HOLDS, "cpu": HOLDS,
                                         "seed-geometry": HOLDS},
    "hqq_more_accurate_than_quanto": {"core-2bit": HOLDS, "core-4bit": UNDECIDED,
                                      "core-4bit-hqq-axis1": HOLDS, "seed-4bit": FAILS,
                                      "seed-4bit-hqq-axis1": HOLDS},
    "hqq_slower_than_quanto": {"tiny": HOLDS, "real": HOLDS},
    "quantization_slows_decoding": {"tiny": HOLDS, "real": HOLDS},
}.items() for setup, verdict in by_setup.items()}


@dataclass
class ClaimResult:
    claim_id: str
    setup: str  # key into EXPECTED
    setting: str  # what was measured, in words
    numbers: str  # the measured numbers with their spread
    margin: str  # what separates the verdict from "not distinguishable"
    verdict: str
    data: dict = field(default_factory=dict)
    predicted: str | None = None  # a GPU setup's expectation: what predicted_verdict implies

    @property
    def text(self) -> str:
        return CLAIMS[self.claim_id]

    @property
    def expected(self) -> str | None:
        return EXPECTED.get((self.claim_id, self.setup), self.predicted)

    @property
    def status(self) -> str:
        if self.expected is None:
            return "no expectation"
        return "as expected" if self.verdict == self.expected else f"CHANGED (expected: {self.expected})"

    def message(self) -> str:
        return (f"{self.text} [{self.setup}: {self.setting}]: {self.verdict}, "
                f"expected {self.expected or 'nothing recorded'}. {self.numbers}; margin: {self.margin}")


def hqq_more_accurate_than_quanto(table, nbits: int, hqq_axis: int = 0) -> ClaimResult:
    """Teacher-forced KL (how far the cache moves the predictions) and perplexity (how well
    it still predicts the text) of hqq vs quanto at ``nbits``, deterministic on CPU; where
    they disagree, "not distinguishable". ``hqq_axis`` 0: the seed's setting for both; 1
    groups hqq like quanto's axis 0 (per batch row: docs/facts.md, batch invariance)."""
    hqq_name = f"hqq{nbits}" + ("-axis1" if hqq_axis == 1 else "")
    hqq, quanto = table.results[hqq_name], table.results[f"quanto{nbits}"]
    numbers = (f"KL {hqq_name} {hqq.kl:.4g} vs quanto{nbits} {quanto.kl:.4g}; "
               f"perplexity {hqq.perplexity:.3f} vs {quanto.perplexity:.3f} (reference {hqq.reference_perplexity:.3f})")
    grouping = "axis 0 for both (the seed's)" if hqq_axis == 0 else "hqq axis 1 vs quanto axis 0 (like-for-like grouping)"
    setting = f"{table.describe()}, {nbits}-bit, {grouping}"
    if table.setup.proxy:
        setting += f"; {table.setup.proxy}"
    kl_says, ppl_says = hqq.kl < quanto.kl, hqq.perplexity < quanto.perplexity
    verdict = (HOLDS if kl_says else FAILS) if kl_says == ppl_says else UNDECIDED
    return ClaimResult("hqq_more_accurate_than_quanto",
                       f"{table.setup.name}-{nbits}bit" + ("-hqq-axis1" if hqq_axis == 1 else ""), setting, numbers,
                       "KL and perplexity must agree (deterministic values); where they point opposite ways "
                       "the text is too short to tell", verdict)


MIB = 2**20
# Memory claims are decided on peak allocated bytes (exact on CPU), cache bytes beside them.
# "A lot": a peak at most 3/4 of none's (the seed's reserved memory: 0.34 and 0.52 of none).
A_LOT = 0.75
# "Little": the peak saves under half the unquantized cache and under 1% of its peak (the
# seed saw no change in GB).
LITTLE_SHARE_OF_CACHE, LITTLE_SHARE_OF_PEAK = 0.5, 0.01


def _at(measurements, backend: str, batch: int):
    return next(m for m in measurements if m.backend == backend and m.batch == batch)


def _memory_numbers(measurements, batch: int) -> str:
    none, parts = _at(measurements, "none", batch).metrics, []
    for b in ("quanto4", "hqq4"):
        m = _at(measurements, b, batch).metrics
        parts.append(f"{b} peak {m['peak_allocated'] / none['peak_allocated']:.3f} of none "
                     f"({m['peak_allocated'] / MIB:.2f} vs {none['peak_allocated'] / MIB:.2f} MiB), "
                     f"cache {m['cache_bytes'] / none['cache_bytes']:.3f} of none")
    return "; ".join(parts)


def saves_a_lot_at_large_batch(setup: str, scenario, measurements) -> ClaimResult:
    """On the seed's geometry: the peak predicted for its 200 rows x 1,008 tokens (prediction.py)."""
    batch = scenario.large_batch
    numbers = _memory_numbers(measurements, batch)
    if scenario.arch == "seed-geometry":
        from kvcache_repro.measure import prediction

        ratios = prediction.ratios(scenario, measurements)
        numbers += "; predicted for the seed: " + ", ".join(f"{b} {r:.3f} of none" for b, r in ratios.items())
        setting = f"{scenario.notes}; peak predicted for 200 rows x 1,008 tokens"
    else:
        none = _at(measurements, "none", batch).metrics["peak_allocated"]
        ratios = {b: _at(measurements, b, batch).metrics["peak_allocated"] / none for b in ("quanto4", "hqq4")}
        setting = f"{scenario.notes}; batch {batch}; peak allocated"
    return ClaimResult("saves_a_lot_at_200_prompts", setup, setting, numbers,
                       f"each peak ratio <= {A_LOT} (exact bytes)",
                       HOLDS if all(r <= A_LOT for r in ratios.values()) else FAILS, {"peak_ratios": ratios})


def predicted_verdict(claim_id: str, setup: str) -> tuple[str | None, str]:
    """(verdict, why) a GPU setup's predicted baselines imply for a memory claim (None: undecided)."""
    from kvcache_repro.measure import scenarios
    from kvcache_repro.verdicts import baseline_file, paths

    scenario = scenarios.get(setup)
    stored = baseline_file.load(paths.baseline_path(setup)).entries
    band = {}
    for backend in ("quanto4", "hqq4"):
        entry = stored.get(baseline_file.entry_key(backend, scenario.large_batch, "peak_allocated"))
        if entry is None or not baseline_file.is_predicted(entry):
            return None, f"{setup}: no predicted peak for {backend} at batch {scenario.large_batch}"
        band[backend] = (entry.ratio - entry.tolerance, entry.ratio + entry.tolerance)
    (qlo, qhi), (hlo, hhi) = band["quanto4"], band["hqq4"]
    rules = {  # claim: (holds, why), (fails, why), why undecided
        "saves_a_lot_at_200_prompts": ((max(qhi, hhi) <= A_LOT, f", all <= {A_LOT}"),
                                       (max(qlo, hlo) > A_LOT, f": one above {A_LOT}"), f" straddle {A_LOT}"),
        "quanto_uses_less_memory_than_hqq": ((qhi < hlo, ": quanto's band below hqq's"),
                                             (hhi < qlo, ": hqq's band below quanto's"), " overlap")}
    if claim_id not in rules:
        raise KeyError(f"no predicted verdict for claim {claim_id!r}")
    (holds, why_holds), (fails, why_fails), undecided = rules[claim_id]
    text = "predicted peak ratios " + ", ".join(f"{b} {lo:.3f}..{hi:.3f}" for b, (lo, hi) in band.items())
    return ((HOLDS, text + why_holds) if holds else (FAILS, text + why_fails) if fails
            else (None, f"{text}{undecided}: the CPU's prediction does not decide it"))


def quanto_less_than_hqq(setup: str, scenario, measurements) -> ClaimResult:
    batch = scenario.large_batch
    q, h = (_at(measurements, b, batch).metrics["peak_allocated"] for b in ("quanto4", "hqq4"))
    return ClaimResult("quanto_uses_less_memory_than_hqq", setup, f"{scenario.notes}; batch {batch}; peak allocated",
                       _memory_numbers(measurements, batch),
                       f"quanto4 peak below hqq4's by {(h - q) / MIB:+.2f} MiB (exact bytes: any gap decides)",
                       HOLDS if q < h else FAILS, {"quanto4": q, "hqq4": h})


def saves_little_for_one_short_prompt(setup: str, scenario, measurements) -> ClaimResult:
    none = _at(measurements, "none", 1)
    savings = {b: none.metrics["peak_allocated"] - _at(measurements, b, 1).metrics["peak_allocated"]
               for b in ("quanto4", "hqq4")}
    cache = none.metrics["cache_bytes"]
    bound = min(LITTLE_SHARE_OF_CACHE * cache, LITTLE_SHARE_OF_PEAK * none.metrics["peak_allocated"])
    numbers = (", ".join(f"{b} saves {s / MIB:.3f} MiB of peak" for b, s in savings.items())
               + f"; the unquantized cache is {cache / MIB:.3f} MiB, its peak {none.metrics['peak_allocated'] / MIB:.1f} MiB")
    return ClaimResult("saves_little_for_one_short_prompt", setup, f"{scenario.notes}; batch 1; peak allocated",
                       numbers, f"each saving < {bound / MIB:.3f} MiB (half the unquantized cache, 1% of its peak)",
                       HOLDS if all(s < bound for s in savings.values()) else FAILS, savings)


def _speed_numbers(ratios) -> str:
    rounds = max(r.rounds for r in ratios.values())
    return (", ".join(f"{r.backend} time/none {r.ratio:.3f} (blocks {r.low:.3f}-{r.high:.3f})" for r in ratios.values())
            + f"; {rounds} rounds")


def hqq_slower_than_quanto(setup, ratios) -> ClaimResult:
    from kvcache_repro.measure import speed

    hqq, quanto = ratios["hqq4"], ratios["quanto4"]
    verdict = {speed.SLOWER: HOLDS, speed.FASTER: FAILS}.get(speed.compare(hqq, quanto), UNDECIDED)
    per_block = ", ".join(f"{r:.3f}" for r in speed.paired(hqq, quanto))
    return ClaimResult("hqq_slower_than_quanto", setup.name, setup.describe(), _speed_numbers(ratios),
                       f"hqq4/quanto4 time in each block of the same rounds: {per_block} (all above 1, or all "
                       "below, decides)",
                       verdict, {"hqq4": asdict(hqq), "quanto4": asdict(quanto)})


def quantization_slows_decoding(setup, ratios) -> ClaimResult:
    from kvcache_repro.measure import speed

    words = [speed.compare(r) for r in ratios.values()]
    verdict = (HOLDS if all(w == speed.SLOWER for w in words) else FAILS if speed.FASTER in words
               else UNDECIDED)
    return ClaimResult("quantization_slows_decoding", setup.name, setup.describe(), _speed_numbers(ratios),
                       "every block of each backend above 1.0 (lowest: "
                       + ", ".join(f"{n} {r.low:.3f}" for n, r in ratios.items()) + ")",
                       verdict, {n: asdict(r) for n, r in ratios.items()})


def in_table_order(results: list[ClaimResult]) -> list[ClaimResult]:
    """In CLAIMS' order, each claim's setups in EXPECTED's: whichever xdist worker finished first."""
    claim_rank = {c: i for i, c in enumerate(CLAIMS)}
    setup_rank = {k: i for i, k in enumerate(EXPECTED)}
    return sorted(results, key=lambda r: (claim_rank.get(r.claim_id, len(claim_rank)),
                                          setup_rank.get((r.claim_id, r.setup), len(setup_rank)), r.setup))


def table(results: list[ClaimResult]) -> str:
    lines = [f"{'claim':<34} {'setup':<20} {'verdict':<20} {'status':<34} numbers"]
    for r in results:
        lines.append(f"{r.claim_id:<34} {r.setup:<20} {r.verdict:<20} {r.status:<34} {r.numbers}")
    return "\n".join(lines)


def markdown(results: list[ClaimResult], header: str) -> str:
    lines = [f"# The seed's claims on this setup\n\n{header}\n",
             "| claim | setting | numbers | margin | verdict | expected |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.text} | {r.setting} | {r.numbers} | {r.margin} | **{r.verdict}** | "
                     f"{r.expected or '-'} |")
    return "\n".join(lines) + "\n"


def write(directory: Path, results: list[ClaimResult], provenance: dict) -> list[Path]:
    """claims.md and claims.json in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    header = ", ".join(f"{k} {v}" for k, v in provenance.get("versions", {}).items())
    header = f"Measured {provenance.get('date', '')} on {provenance.get('device', '?')}; {header}."
    md, js = directory / "claims.md", directory / "claims.json"
    md.write_text(markdown(results, header))
    js.write_text(json.dumps({"provenance": provenance,
                              "claims": [{**asdict(r), "claim": r.text, "expected": r.expected,
                                          "status": r.status} for r in results]}, indent=2, default=str) + "\n")
    return [md, js]
