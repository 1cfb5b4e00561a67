"""The suite's own timings, kept so that the next slowdown shows in a diff: the CPU tier per
test file (setup + call + teardown, summed over workers) and the main job per row. Every run
writes its own to results/timings/ and prints each group beside the recorded ones
(baselines/timings/recorded.json), which ``pytest --kv-record-timings`` and ``./kvq experiment
--record-timings`` rewrite (the file is committed: a slower group is a changed line).
Information only: nothing fails on a slow machine.
"""
from __future__ import annotations

import json
from pathlib import Path

from kvcache_repro.core.atomic import write_atomic as write_text

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "baselines" / "timings" / "recorded.json"
RUNS = ROOT / "results" / "timings"
TOTAL = "total (wall)"


def _slug(what: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in what).strip("-")


def load(path: Path | None = None) -> dict:
    path = path or RECORDED
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable timings file ({error}); restore it with git "
                         f"(`git checkout -- {path}`) or record it again with --kv-record-timings") from None


def write_run(what: str, seconds: dict[str, float], produced_by: dict, runs: Path | None = None) -> Path:
    """This run's timings of ``what`` ("tier", "experiment cpu"), beside the others of results/."""
    path = (runs or RUNS) / f"{_slug(what)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({"what": what, "seconds": _rounded(seconds), "produced_by": produced_by},
                                indent=2, sort_keys=True) + "\n")
    return path


def record(what: str, seconds: dict[str, float], produced_by: dict, path: Path | None = None) -> None:
    path = path or RECORDED
    data = load(path)
    data[what] = {"seconds": _rounded(seconds), "produced_by": produced_by}
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in seconds.items()}


def lines(what: str, seconds: dict[str, float], path: Path | None = None, top: int = 12) -> list[str]:
    """The dearest ``top`` groups (and the total) beside the recorded run of ``what``."""
    path = path or RECORDED
    entry = load(path).get(what)
    stored = entry["seconds"] if entry else {}
    where = (f"beside those recorded {entry['produced_by'].get('date', '?')} in {path.name}" if entry
             else f"nothing recorded for {what!r} in {path.name} yet")
    out = [f"{what}: seconds per group, {where} (information only)"]
    shown = sorted((k for k in seconds if k != TOTAL), key=lambda k: -seconds[k])[:top]
    for key in shown + [k for k in (TOTAL,) if k in seconds]:
        before = stored.get(key)
        beside = f"  recorded {before:7.1f}  x{seconds[key] / before:4.2f}" if before else ""
        out.append(f"  {key:<40} {seconds[key]:7.1f}{beside}")
    if len(seconds) - (TOTAL in seconds) > len(shown):
        out.append(f"  ... {len(seconds) - len(shown) - (TOTAL in seconds)} more in the run's file")
    return out


def keep(what: str, seconds: dict[str, float], produced_by: dict, record_them: bool = False) -> list[str]:
    """What a run says of its timings: them beside the recorded ones, where its own file went,
    and (``record_them``) that they are the recorded ones now. Never raises: information only."""
    try:
        out = lines(what, seconds)
        out.append(f"written to {write_run(what, seconds, produced_by)}")
        if record_them:
            record(what, seconds, produced_by)
            out.append(f"recorded in {RECORDED} as {what!r}")
    except Exception as error:  # a file of another shape too: information never stops a run
        out = [f"timings of {what} not kept: {type(error).__name__}: {error}"]
    return out
