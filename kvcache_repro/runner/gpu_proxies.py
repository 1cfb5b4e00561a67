"""The CPU runs behind the GPU predictions (gpu_prediction.py), one target per child process:
``python -m kvcache_repro.runner.gpu_proxies measure|holes SCENARIO`` prints its JSON on the
last line of stdout. ``measure``: the proxies' bytes at the peak; ``holes``: an allocation
sequence replayed through expandable segments."""
from __future__ import annotations

import json
import sys

from kvcache_repro.measure import reserved, scenarios
from kvcache_repro.runner.gpu_prediction import (PROXY_ROWS, holes_run, proxy_runs, proxy_scenario,
                                                 python_unpack_on_cpu)


def measure_proxies(target: scenarios.Scenario) -> dict[str, dict[str, dict[int, int]]]:
    """backend -> role -> new tokens -> bytes alive at the peak beyond weights and inputs."""
    from kvcache_repro.backends import quanto_unpack
    from kvcache_repro.measure import memory, threads

    threads.pin()
    if python_unpack_on_cpu(target):
        quanto_unpack.install("quanto_cpp")
    out: dict[str, dict[str, dict[int, int]]] = {}
    for role, arch, n in proxy_runs(target):
        proxy = proxy_scenario(target, arch, n)
        model, tokenizer = memory.load_model(proxy)
        for backend in target.backends:
            m = memory.measure(proxy, backend, PROXY_ROWS, model, tokenizer)
            grown = m.metrics["peak_allocated"] - m.before_bytes
            out.setdefault(backend, {}).setdefault(role, {})[n] = grown
            print(f"  {proxy.name} {backend}: {grown / 2**20:.3f} MiB at the peak beyond weights and inputs",
                  file=sys.stderr, flush=True)
        del model
    return out


def measure_holes(target: scenarios.Scenario) -> dict[str, dict[int, float]]:
    """backend -> batch -> holes share: holes_run traced (peak.PeakTracker) at PROXY_ROWS rows,
    replayed through expandable segments (reserved.replay) with every size x batch / PROXY_ROWS:
    (peak reserved - peak allocated) / peak allocated, of what generate allocated."""
    from kvcache_repro.backends import generation, quanto_unpack
    from kvcache_repro.measure import memory, peak, threads

    threads.pin()
    if python_unpack_on_cpu(target):
        quanto_unpack.install("quanto_cpp")
    arch, n = holes_run(target)
    proxy = proxy_scenario(target, arch, n)
    model, tokenizer = memory.load_model(proxy)
    out: dict[str, dict[int, float]] = {}
    for backend in target.backends:
        ids, mask = memory.make_inputs(proxy, tokenizer, PROXY_ROWS)
        spec = memory.BACKENDS[backend]
        generation.generate(model, ids[:1], spec, proxy.settings, 2, attention_mask=mask[:1], keep_scores=False)
        trace: list = []
        tracker = peak.PeakTracker(trace)
        tracker.ignore([*model.parameters(), *model.buffers(), ids, mask])
        with tracker:
            generation.generate(model, ids, spec, proxy.settings, n, attention_mask=mask, keep_scores=False)
        for batch in target.batch_sizes:
            live, mapped = reserved.replay(trace, batch / PROXY_ROWS)
            out.setdefault(backend, {})[batch] = round((mapped - live) / live, 4)
        print(f"  {proxy.name} {backend}: {len(trace)} allocations and frees; holes {out[backend]}",
              file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    command, name = argv or sys.argv[1:]
    run = {"measure": measure_proxies, "holes": measure_holes}[command]
    print(json.dumps(run(scenarios.get(name))))  # the parent reads the last line
    return 0


if __name__ == "__main__":
    sys.exit(main())
