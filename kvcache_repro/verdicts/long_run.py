"""The seed's length through every quantized cache (measure/long_run.py): its peak ratios'
baselines/long-cache.json, recorded by `python -m kvcache_repro.verdicts.long_run record`."""
from __future__ import annotations

import sys

from kvcache_repro.core import metrics, provenance
from kvcache_repro.measure.long_run import ARCH, DTYPE, NAME, NEW, PROMPT, ROWS, SETTINGS, peak_ratios
from kvcache_repro.verdicts import baseline_file, baseline_update


def baseline_path():
    return baseline_file.BASELINE_DIR / f"{NAME}.json"


def record() -> list[str]:
    produced_by = provenance.produced_by(
        "cpu", "python -m kvcache_repro.verdicts.long_run record",
        {"arch": ARCH, "rows": ROWS, "prompt": PROMPT, "new_tokens": NEW, "dtype": str(DTYPE),
         "q_group_size": SETTINGS.q_group_size, "residual_length": SETTINGS.residual_length})
    entries = [baseline_file.Entry(name, ROWS, "peak_allocated", round(ratio, 6),
                                   metrics.default_tolerance("cpu", "peak_allocated"), produced_by)
               for name, ratio in peak_ratios().items()]
    return baseline_update.update(
        baseline_path(), entries, run_failed=False, scenario=NAME,
        description="peak live tensor bytes of the cache driven through the seed's 1,008 tokens "
                    "(fp16, G 128, R 64, dry-tiny geometry, 2 rows), over the unquantized cache's")


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python -m kvcache_repro.verdicts.long_run record")
    from kvcache_repro.measure import threads

    threads.pin()
    print(*record(), sep="\n")
