"""SUMMARY.md of ``./kvq device-run`` (gpu/device_run.py): every table, the seed's own
numbers beside ours and why they compare or not, and the allocator's two settings."""
from __future__ import annotations

from pathlib import Path

from kvcache_repro.runner import experiment
from kvcache_repro.measure import reserved
from kvcache_repro.measure.prediction import SEED_RESERVED_GB
from kvcache_repro.runner.worker import NOTES_SEPARATOR

SEED_RESERVED_BEFORE_GB = 5.40  # the seed's reserved before generate, in every run (docs/facts.md)
GIB = 2**30


def notes_of(measurements) -> list[str]:
    return sorted({n for m in measurements for n in m.notes.split(NOTES_SEPARATOR) if n})


def markdown(records: dict, runs: dict[str, experiment.ExperimentRun], environment: dict,
             pytest_result: str, wall: float, default_allocator: dict | None = None) -> str:
    """``records``: device_run.ScenarioRecord by name; ``default_allocator``: run_default_allocator's rows."""
    from kvcache_repro.runner import report

    v = environment["versions"]
    lines = [f"# ./kvq device-run{' --dry-run' if environment['dry_run'] else ''}", "",
             f"{environment['device']}; torch {v.get('torch')}, transformers {v.get('transformers')}, "
             f"optimum-quanto {v.get('optimum-quanto')}, hqq {v.get('hqq')}; "
             f"wall time {wall:.0f} s of a {environment['budget_s']:.0f} s budget.",
             "", "| scenario | status | runs | wall s | note |", "|---|---|---:|---:|---|"]
    for name, r in records.items():
        lines.append(f"| {name} | {r.status} | {len(r.measurements)} | {r.wall():.0f} | "
                     f"{r.reason or r.why(3)} |")
    for name, run in runs.items():
        lines += ["", f"## {name}", "", run.scenario.notes, "", "```",
                  report.table(run.scenario, run.measurements, run.ratios, run.verdicts), "```"]
        lines += [f"- {n}" for n in notes_of(run.measurements)]
        rows = (default_allocator or {}).get(name, [])
        lines += seed_comparison(run, rows) + allocator_lines(run, rows)
    lines += ["", "## pytest -m gpu", "", pytest_result]
    claims_md = Path(environment.get("outdir", "")) / "claims.md"
    if environment.get("outdir") and claims_md.exists():  # written by the pytest step (the plugin's summary)
        lines += ["", "## The seed's claims, decided on these rows", "", claims_md.read_text().strip()]
    return "\n".join(lines) + "\n"


def allocator_lines(run: experiment.ExperimentRun, rows: list) -> list[str]:
    """The large batch's rows (expandable segments, compared) beside their default-allocator reruns."""
    batch = run.scenario.large_batch
    if not rows:
        return []
    if run.scenario.device != "cuda":  # a dry run: the rows ran to test the path; CPU has no such allocator
        return ["", f"Allocator: {len(rows)} large-batch reruns under the default allocator ran (the code path); "
                    "on the CPU the setting changes nothing"]
    lines = ["", f"Allocator, b{batch}: expandable segments (compared) vs the default caching allocator (the "
                 "seed's reading: 2 MiB-rounded blocks kept cached; peak allocated should agree):", "",
             "| backend | peak allocated GiB | expandable: peak reserved | reserved after | retries | "
             "default: peak reserved | reserved after | retries |", "|---" + "|---:" * 7 + "|"]

    def cells(m):
        got = m.metrics.get
        return (f"{got('peak_reserved', 0) / GIB:.2f} | {got('reserved_after', 0) / GIB:.2f} | "
                f"{got(reserved.ALLOC_RETRIES, '-')}")

    for backend, m in rows:
        try:
            compared = run.get(backend, batch)
        except experiment.RowNotMeasured:
            continue
        other = cells(m) if not isinstance(m, str) else f"{m} | | "
        lines.append(f"| {backend} | {compared.metrics.get('peak_allocated', 0) / GIB:.2f} | {cells(compared)}"
                     f" | {other} |")
    return lines


def seed_comparison(run: experiment.ExperimentRun, default_rows: list) -> list[str]:
    """The seed's reserved-after numbers beside ours under the same allocator (the default one:
    ``default_rows``, run_default_allocator's), as ratios to none at the large batch: as read
    (weights included) and as growth over what was reserved before generate (weights excluded:
    comparable across NF4 and fp16 weights and layer counts)."""
    batch, seed_none, before = run.scenario.large_batch, SEED_RESERVED_GB["none"], SEED_RESERVED_BEFORE_GB
    if run.scenario.device != "cuda":
        return []
    by_backend = {b: m for b, m in default_rows if not isinstance(m, str)}
    none = by_backend.get("none")
    if none is None:
        return ["", f"Beside the seed: b{batch} did not run under the default allocator (the seed's reading; "
                    "--no-default-allocator, or no time left), and reserved memory under expandable segments is "
                    "not the seed's quantity: nothing is set beside its reserved-after figures."]
    lines = ["", f"Beside the seed (b{batch} under the default allocator, as the seed ran; the seed: NF4 "
                 "Llama-3-8B, reserved after generate, GB = GiB):",
             "",
             "| backend | seed reserved after | seed ratio | seed growth ratio | ours reserved after GiB | "
             "ours ratio | ours growth ratio | cache ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    saw = []
    for backend in run.scenario.backends:
        m = by_backend.get(backend)
        if m is None:
            continue
        seed = SEED_RESERVED_GB.get(backend)
        ours, ours_none = m.metrics["reserved_after"], none.metrics["reserved_after"]
        growth = (ours - m.before_bytes) / max(ours_none - none.before_bytes, 1)
        lines.append(f"| {backend} | {seed:.2f} | {seed / seed_none:.3f} | "
                     f"{(seed - before) / (seed_none - before):.3f} | {ours / GIB:.2f} | "
                     f"{ours / ours_none:.3f} | {growth:.3f} | "
                     f"{m.metrics['cache_bytes'] / none.metrics['cache_bytes']:.3f} |")
        saw += [backend] if m.metrics.get(reserved.ALLOC_RETRIES) else []
    total = none.metrics.get(reserved.DEVICE_TOTAL)
    lines += [
        "", "Which of these compare, and why:",
        "- cache ratio: exact bytes of what the cache holds, no allocator and no card in it; the seed's "
        "cache held the same at 200 x 1,008 tokens with Llama-3-8B's geometry (seed-arch: the same "
        "geometry; seed-arch-short and gpu-small: other geometries, so other numbers).",
        "- reserved after generate (the seed's only figure): what the caching allocator held, live "
        "tensors plus cached free blocks and 2 MiB rounding. A cache grown one token a step leaves "
        "blocks of every size behind until cudaMalloc fails; then the allocator frees them all and "
        "retries, so a reading lands anywhere on a saw-tooth at the card's capacity "
        "(measure/reserved.py). The seed's 55.99 GB for none is such a reading on an unknown card; it "
        "is comparable with ours only where both runs hit capacity on cards of the same size.",
        f"- here: device of {total / GIB:.1f} GiB" if total else "- here: device size not read",
        "  " + (f"saw-tooth (allocation retries) in {', '.join(saw)}: reserved figures of those rows are "
                "capacity readings" if saw else "no allocation retries: every reserved figure here is "
                "below capacity, a different regime from a saw-tooth reading"),
        "- growth ratios take the weights out (NF4 5.3 GiB there, fp16 here) but not the cached blocks: "
        "comparable in direction, not in value.",
        "- what this run compares is peak reserved under expandable segments and peak allocated (live bytes, "
        "transients included) against the CPU's prediction or this card's own entries (baselines/, "
        "runner/gpu_prediction.py)."]
    return lines
