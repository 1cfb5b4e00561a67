"""The memory experiment's scenarios: data in scenarios.toml, validated here, plus a user's
own files (``KVQ_SCENARIOS``, docs/memory.md) and models (``model_scenario``).
``get("NAME-dry")`` is NAME's dry run: same code path, tiny model, CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from kvcache_repro.backends import offline
from kvcache_repro.backends.matrix import BACKENDS, QuantSettings, SelectionError
from kvcache_repro.core import metrics

# The seed's ten prompts, repeated 20 times for its batch of 200.
SEED_PROMPTS = ("The best tomato sauce is", "Artificial intelligence is", "The future of technology is",
                "Climate change is", "The benefits of exercise are", "Healthy eating includes",
                "The importance of sleep is", "The universe is", "Machine learning is",
                "Renewable energy sources are")
SEED_CHECKPOINT = "gradientai/Llama-3-8B-Instruct-Gradient-1048k"
# What the device run's scenarios compare, predicted from the CPU (runner/gpu_prediction.py):
# peak reserved under expandable segments (reserved.py), peak allocated, cache bytes.
PREDICTED_METRICS = ("peak_reserved", "peak_allocated", "cache_bytes")


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
    # Ratios compared with baselines/<name>.json (Peak RSS is reported, never compared:
    # glibc's heap makes it irreproducible, 0.86 vs 1.12 in two runs).
    baseline_metrics: tuple[str, ...] = ("peak_allocated", "cache_bytes")
    notes: str = ""
    arch: str | None = None  # model "random": an offline.ARCHS name, "NAME@LAYERS" for fewer layers
    fallback_arch: str | None = None  # model "small-real": random weights of this arch when it is absent
    # Its baselines' file under baselines/ without ".json" (default: the name); a user's model
    # keeps them in a file keyed by what its numbers depend on (model_scenario).
    baseline_name: str | None = None
    baseline_key: dict | None = None  # what the file's numbers depend on (model, dtype, weights, device, settings)
    # (batch, new tokens) pairs overriding new_tokens at those batch sizes: the seed's "one
    # prompt, few output tokens" beside its long run at the large batch, in one table.
    new_tokens_at: tuple[tuple[int, int], ...] = ()
    large_batch: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "large_batch", max(self.batch_sizes))
        object.__setattr__(self, "new_tokens_at", tuple(sorted((int(b), int(n)) for b, n in
                                                               dict(self.new_tokens_at).items())))
        for batch, _ in self.new_tokens_at:
            if batch not in self.batch_sizes:
                raise SelectionError(f"scenario {self.name}: new_tokens_at names batch {batch}, "
                                     f"not one of its batch_sizes {self.batch_sizes}")
        for name in self.backends:
            if name not in BACKENDS:
                raise SelectionError(f"scenario {self.name}: unknown backend {name!r}")

    @property
    def records_first_run(self) -> bool:
        """A CUDA scenario (entries of this card's own) and a user's model record what no file holds
        on their first run, as pytest-regressions does; the CPU scenarios' files are complete, so a
        missing entry there is a fault (runner/experiment.py record_first_run)."""
        return self.device == "cuda" or self.baseline_key is not None

    def tokens(self, batch: int) -> int:
        """New tokens generated at ``batch``: new_tokens unless new_tokens_at says otherwise."""
        return dict(self.new_tokens_at).get(batch, self.new_tokens)

    def prompts(self, batch: int) -> list[str]:
        """The seed's prompts cycled to ``batch`` rows (200 = the seed's 10 x 20)."""
        return [SEED_PROMPTS[i % len(SEED_PROMPTS)] for i in range(batch)]


# What ./kvq device-run measures on a CUDA box, in this order: the seed's claim first.
DEVICE_PLAN = ("seed-arch-short", "seed-arch", "gpu-small", "gpu-tiny")


def to_json(scenario: Scenario) -> dict:
    return {k: v for k, v in asdict(scenario).items() if k != "large_batch"}


def from_json(data: dict) -> Scenario:
    data = dict(data)
    data["settings"] = QuantSettings(**data["settings"])
    for name in ("batch_sizes", "backends", "baseline_metrics"):
        if name in data:
            data[name] = tuple(data[name])
    if isinstance(data.get("new_tokens_at"), dict):  # TOML's keys are strings; to_json's pairs are lists
        data["new_tokens_at"] = tuple((int(b), n) for b, n in data["new_tokens_at"].items())
    elif "new_tokens_at" in data:
        data["new_tokens_at"] = tuple(tuple(pair) for pair in data["new_tokens_at"])
    return Scenario(**data)


# ---- the scenarios, from data -----------------------------------------------------------

DATA = Path(__file__).with_name("scenarios.toml")
USER_ENV = "KVQ_SCENARIOS"  # a user's scenario files (os.pathsep between several), validated as DATA
SEED_BACKENDS = ("none", "quanto4", "hqq4")  # a file's default backends
TESTS = ("experiment", "experiment-dry", "claims")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# What a scenario file may give: (type, element type of a list); tests and slow are no
# Scenario fields: they select the test parameters (for_tests).
FIELDS = {"device": (str,), "model": (str,), "batch_sizes": (list, int), "new_tokens": (int,), "backends": (list, str),
          "settings": (dict, int), "dtype": (str,), "checkpoint": (str,), "weights_nf4": (bool,),
          "baseline_metrics": (list, str), "notes": (str,), "arch": (str,), "fallback_arch": (str,),
          "new_tokens_at": (dict, int), "tests": (list, str), "slow": (bool,)}
REQUIRED = ("device", "model", "batch_sizes", "new_tokens", "settings", "dtype")
CHOICES = {"device": ("cuda", "cpu"), "model": ("checkpoint", "small-real", "tiny", "random"),
           "dtype": tuple(DTYPES.values()), "backends": tuple(BACKENDS), "tests": TESTS,
           "settings": tuple(f.name for f in fields(QuantSettings)), "baseline_metrics": tuple(metrics.METRICS)}


class ScenarioError(SelectionError):
    """A scenario file's entry that is no valid scenario: names the file, scenario and field."""


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check(path, name: str, entry) -> None:
    def fail(field, problem, allowed):
        raise ScenarioError(f"{path}: scenario {name!r}, field {field!r}: {problem}; allowed: {allowed}")
    if not isinstance(entry, dict):
        fail("name", f"{name} = {entry!r} is outside any [NAME] table", "one [NAME] table per scenario")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        fail("name", "not a valid name (it names the baseline file)", "letters, digits, '.', '_', '-'")
    for field in [*entry.keys() - FIELDS.keys(), *(f for f in REQUIRED if f not in entry)]:
        fail(field, "unknown field" if field in entry else "missing",
             f"{', '.join(FIELDS)} (required: {', '.join(REQUIRED)})")
    for field, value in entry.items():
        kind, *item = FIELDS[field]
        ok = _is(value, kind)
        items = (list(value.values()) if kind is dict else value) if ok and item else [value]
        if not ok or (item and not all(_is(v, item[0]) for v in items)):
            fail(field, f"{value!r} is the wrong type", " of ".join(t.__name__ for t in FIELDS[field]))
        for bad in [v for v in (value if item else [value]) if v not in CHOICES.get(field, [v])]:
            fail(field, f"unknown {bad!r}", ", ".join(CHOICES[field]))
        if field == "new_tokens_at" and (stray := [k for k in value if not k.isdigit()
                                                     or int(k) not in entry.get("batch_sizes", [])]):
            fail(field, f"{stray[0]!r} is not one of batch_sizes", "a table {BATCH = NEW_TOKENS} over batch_sizes")
        if (field in ("batch_sizes", "new_tokens", "settings", "new_tokens_at")
                and (value == [] or any(n < 1 for n in items))):
            fail(field, f"{value!r} is not positive", "positive integers" + (", at least one" if kind is list else ""))
        if field in ("arch", "fallback_arch"):
            try:
                offline.arch_config_kwargs(value)
            except (KeyError, ValueError):
                fail(field, f"unknown architecture {value!r}", f"NAME or NAME@LAYERS, NAME: {', '.join(offline.ARCHS)}")
    if entry.get("new_tokens_at") and entry["device"] == "cuda":
        fail("new_tokens_at", "a CUDA scenario's GPU predictions and claims take one length", "CPU scenarios only")
    if entry["model"] == "random" and "arch" not in entry:
        fail("arch", "missing (model 'random' builds an architecture)", ", ".join(offline.ARCHS))
    if entry["model"] == "checkpoint" and "checkpoint" not in entry:
        fail("checkpoint", "missing (model 'checkpoint' loads one)", "a hub id or a local directory")


def load(path, taken=()) -> dict[str, dict]:
    """The entries of the TOML file ``path``, validated; a name in ``taken`` (the built-in ones) is refused."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ScenarioError(f"{path}: not a readable TOML scenario file: {error}") from error
    for name, entry in data.items():
        if name in taken:
            raise ScenarioError(f"{path}: scenario {name!r} is already defined (built in, {DATA.name}, or in an "
                                f"earlier {USER_ENV} file): a file adds scenarios, never redefines one; rename yours")
        _check(path, name, entry)
    return data


def for_tests(test: str) -> list[tuple[str, tuple[str, ...]]]:
    """(name, pytest markers) of the scenarios that ``test`` (one of TESTS) runs, in file order: "gpu"
    on CUDA, "slow" where the file says slow."""
    return [(n, ("gpu",) * (SCENARIOS[n].device == "cuda") + ("slow",) * e.get("slow", False))
            for n, e in ENTRIES.items() if test in e.get("tests", ())]


ENTRIES = load(DATA)
if os.environ.get(USER_ENV):  # absolute, so that workers (started in the checkout) read the same files
    os.environ[USER_ENV] = os.pathsep.join(str(Path(p).resolve()) for p in os.environ[USER_ENV].split(os.pathsep) if p)
for _path in filter(None, os.environ.get(USER_ENV, "").split(os.pathsep)):
    ENTRIES.update(load(_path, ENTRIES))
SCENARIOS: dict[str, Scenario] = {  # tests and slow select test parameters only (for_tests)
    n: from_json({"backends": SEED_BACKENDS, **{k: v for k, v in e.items() if k not in ("tests", "slow")},
                  "name": n}) for n, e in ENTRIES.items()}


DRY_SUFFIX = "-dry"
DRY_ARCH = "dry-tiny"


def dry_run(scenario: Scenario) -> Scenario:
    """``scenario``'s dry run: its backends, settings and code path on a tiny random model on
    the CPU, in seconds. Batch 4 only (a worker spends ~8 s importing torch), 72 new tokens
    (one flush at residual 64), float32 (fp16 took 9.9 s for the 1.2 s of float32)."""
    return replace(scenario, name=scenario.name + DRY_SUFFIX, device="cpu", model="random", arch=DRY_ARCH,
                   fallback_arch=None, checkpoint=None, weights_nf4=False, batch_sizes=(4,), new_tokens=72,
                   new_tokens_at=(), dtype="float32", baseline_metrics=PREDICTED_METRICS,
                   notes=f"DRY RUN of {scenario.name} on CPU: {scenario.notes}")


# ---- a user's model --------------------------------------------------------------------

MODEL_PREFIX = "model-"
# Model scenarios made in this process, passed to workers (which get a name) as JSON.
RUNTIME_ENV = "KVQ_MODEL_SCENARIOS"
_RUNTIME: dict[str, Scenario] = {}
WEIGHTS = ("native", "nf4")


def model_scenario(model: str, identity: dict, device: str, device_name: str, backends, batch_sizes, new_tokens: int,
                   dtype: str, weights: str = "native", q_group_size: int = 128, residual_length: int = 64,
                   text: str | None = None) -> Scenario:
    """The seed's protocol on ``model`` (a hub id or a local directory) with these settings.
    ``identity`` names its architecture (checkpoints.identity); a digest of it, dtype,
    weights, device name and settings (and of ``text``'s bytes, the accuracy's text, where
    one is given) names the scenario and its baseline file, which holds them in full
    (baseline_file.BaselineFile.key)."""
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
    if text is not None:  # another text, other accuracy numbers: never compared with the default text's
        key["accuracy_text"] = {"file": Path(text).name, "sha256": hashlib.sha256(Path(text).read_bytes()).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(identity.get("name", model))).strip("-.")[:60] or "model"
    name = f"{MODEL_PREFIX}{slug}-{digest}"
    return Scenario(name, device, "checkpoint", tuple(batch_sizes), new_tokens, tuple(backends), settings, dtype,
                    checkpoint=model, weights_nf4=weights == "nf4",
                    baseline_metrics=PREDICTED_METRICS if device == "cuda" else ("peak_allocated", "cache_bytes"),
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
