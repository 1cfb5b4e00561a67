"""A user's own model (``./kvq experiment --model``): its scenario, its own baseline file
keyed by what determines its numbers, and the errors that stop it before any worker; end
to end, a tiny Llama saved as a user's directory gets its memory, accuracy and speed report,
records its own file and passes it."""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from kvcache_repro import commands
from kvcache_repro.backends import checkpoints
from kvcache_repro.runner import experiment, scenario_choice
from kvcache_repro.measure import scenarios
from kvcache_repro.verdicts import baseline_file, baseline_update

ARGS = dict(device="cpu", device_name="cpu", backends=("none", "quanto4"), batch_sizes=(1, 2), new_tokens=24,
            dtype="float32", weights="native", q_group_size=32, residual_length=8)
IDENTITY = {"name": "my-model", "local": True, "config_sha256": "0" * 16}


def _scenario(identity=IDENTITY, **changes):
    return scenarios.model_scenario("/models/my-model", identity, **{**ARGS, **changes})


def test_a_model_scenario_is_named_by_what_determines_its_numbers():
    """Same model and settings -> same file; another dtype, device, weights or setting ->
    another file; never a built-in scenario's file."""
    base = _scenario()
    assert _scenario().name == base.name
    others = [_scenario(dtype="bfloat16"), _scenario(device_name="NVIDIA H200", device="cuda"),
              _scenario(residual_length=16), _scenario(new_tokens=64),
              _scenario(identity={**IDENTITY, "config_sha256": "1" * 16})]
    names = {s.name for s in [base, *others]}
    assert len(names) == 6, names
    for s in [base, *others]:
        assert s.baseline_name == f"models/{s.name}" and s.baseline_key is not None
        assert s.name not in scenarios.SCENARIOS
    assert _scenario(batch_sizes=(1, 8)).name == base.name  # entries are keyed by batch: one file holds both


def test_another_accuracy_text_is_another_baseline_file(tmp_path):
    """--text: its bytes join the key (its KL is never compared with the default text's);
    the same bytes under another path, the same file."""
    (tmp_path / "a.txt").write_text("one text"), (tmp_path / "b.txt").write_text("another text")
    (tmp_path / "c").mkdir(), (tmp_path / "c" / "a.txt").write_text("one text")
    names = [_scenario(text=str(tmp_path / p)).name for p in ("a.txt", "b.txt", "c/a.txt")]
    assert len({_scenario().name, *names}) == 3 and names[0] == names[2]
    assert _scenario(text=str(tmp_path / "a.txt")).baseline_key["accuracy_text"]["file"] == "a.txt"


def test_the_worker_rebuilds_a_registered_model_scenario(monkeypatch):
    """Workers get the scenario by name: register() passes it through the environment."""
    monkeypatch.delenv(scenarios.RUNTIME_ENV, raising=False)
    s = scenarios.register(_scenario())
    code = ("import json, sys; from kvcache_repro.measure import scenarios; "
            "print(json.dumps(scenarios.to_json(scenarios.get(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, s.name], capture_output=True, text=True, check=True,
                         cwd=experiment.ROOT).stdout
    assert scenarios.from_json(json.loads(out)) == s


def test_bad_settings_stop_with_the_reason():
    with pytest.raises(scenarios.SelectionError, match="runs on CUDA only"):
        _scenario(weights="nf4")
    with pytest.raises(scenarios.SelectionError, match="unknown dtype"):
        _scenario(dtype="float64")


def test_a_file_of_another_setup_is_never_overwritten(tmp_path):
    s = _scenario()
    entry = baseline_file.Entry("quanto4", 1, "cache_bytes", 0.5, 0.001, {"versions": {}})
    path = tmp_path / "f.json"
    baseline_update.update(path, [entry], run_failed=False, scenario=s.name, key=s.baseline_key)
    before = path.read_bytes()
    with pytest.raises(baseline_file.BaselineError, match="another setup"):
        baseline_update.update(path, [entry], run_failed=False, scenario=s.name, key={**s.baseline_key, "dtype": "x"})
    assert path.read_bytes() == before
    assert baseline_file.load(path).key == s.baseline_key


def test_another_model_is_refused_as_the_seed():
    """--scenario seed --checkpoint X compares X with the seed's ratios: only the seed's
    architecture may stand in."""
    from kvcache_repro.backends.offline import ARCHS

    assert scenario_choice.not_the_seed_model(ARCHS["llama3-8b"]) == []
    differs = scenario_choice.not_the_seed_model(ARCHS["smollm2-135m"])
    assert "hidden_size 576 (the seed's: 4096)" in differs and len(differs) == 6


@pytest.mark.parametrize("error, says", [
    ("OSError: You are trying to access a gated repo. 401 Client Error", "gated"),
    ("OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
     "cached files. Check your internet connection or see how to run the library in offline mode", "offline"),
    ("OSError: some/model is not a local folder and is not a valid model identifier", "no such model"),
])
def test_a_model_that_cannot_load_says_why_and_the_fix(error, says):
    text = checkpoints.explain("some/model", error)
    assert says in text and "Fix:" in text, text


def test_a_missing_directory_is_named_as_such(tmp_path):
    assert "no such local directory" in checkpoints.explain(str(tmp_path / "nope"), "OSError: Repo id must be")
    assert "no config.json" in checkpoints.explain(str(tmp_path), "ValueError: Unrecognized model")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a user's model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from kvcache_repro.backends.model_cache import ModelUnavailable
    from kvcache_repro.backends.models import expanded_dir, small_real_model_path

    try:
        source = expanded_dir(small_real_model_path(), "float32")
    except ModelUnavailable as error:
        pytest.skip(f"needs the small real model's tokenizer: {error}")
    if source is None or not (source / "tokenizer.json").exists():
        pytest.skip("the small real model is not expanded (./kvq setup does it)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    directory = tmp_path_factory.mktemp("user-model") / "tiny-user-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.json"))}


def test_a_saved_model_runs_and_records_a_baseline_file_of_its_own(saved_model, tmp_path, monkeypatch, capsys):
    """./kvq experiment --model DIR ... --update-baselines writes baselines/models/<name>.json
    and nothing else; a second run compares against it and passes."""
    root = tmp_path / "baselines"
    shutil.copytree(baseline_file.BASELINE_DIR, root)
    monkeypatch.setattr(baseline_file, "BASELINE_DIR", root)
    monkeypatch.delenv(scenarios.RUNTIME_ENV, raising=False)
    before = _digests(root)
    # the config is read once, in a child process; the second run reuses it (saves 7 s of CPU)
    monkeypatch.setattr(checkpoints, "probe", functools.cache(checkpoints.probe))
    argv = ["--model", str(saved_model), "--device", "cpu", "--backends", "none,quanto4,hqq4", "--batch-sizes", "1,2",
            "--new-tokens", "24", "--q-group-size", "32", "--residual-length", "8", "--in-process",
            "--output-dir", str(tmp_path / "a")]
    assert commands.call("experiment", [*argv, "--update-baselines"]) == 0
    after = _digests(root)
    new = sorted(set(after) - set(before))
    assert f"first run: 16 baseline entries recorded in {root / new[0]}" in capsys.readouterr().out
    assert len(new) == 1 and new[0].startswith("models/model-tiny-user-llama-"), new
    assert {k: after[k] for k in before} == before  # every built-in file byte-identical
    stored = baseline_file.load(root / new[0])
    assert stored.key["model"]["name"] == "tiny-user-llama" and stored.key["device"] == "cpu"
    assert {e.metric for e in stored.entries.values()} == {
        "peak_allocated", "cache_bytes", "kl", "top1_agreement", "perplexity_ratio", "decode_time_ratio"}
    # 2 quantized backends x (2 batches x 2 memory metrics + 3 accuracy metrics + the decode time ratio)
    assert len(stored.entries) == 16
    # the same memory rows compared again (--resume: not re-measured), accuracy and speed measured
    # again: all read that file and pass
    rc = commands.call("experiment", [*argv, "--resume"])
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    # exact bytes and deterministic accuracy: ok; the decode time (4 rounds, beside the tier's other
    # worker) compared with its band, whichever way it goes: timing is not asserted in a test
    assert [v["status"] for v in results["verdicts"] if not v["key"].endswith("/decode_time_ratio")] == ["ok"] * 14
    assert [v["status"] in ("ok", "regression", "improvement") and v["stored"] is not None
            for v in results["verdicts"] if v["key"].endswith("/decode_time_ratio")] == [True, True]
    assert rc == (0 if all(v["status"] == "ok" for v in results["verdicts"]) else 1)
    report = json.loads((tmp_path / "a" / "model.json").read_text())
    assert set(report["accuracy"]["results"]) == {"quanto4", "hqq4"} and set(report["speed"]["ratios"]) == {
        "quanto4", "hqq4"} and not report["failures"]
    assert {c["claim_id"] for c in report["claims"]} >= {"saves_little_for_one_short_prompt",
                                                         "hqq_more_accurate_than_quanto", "hqq_slower_than_quanto"}
    assert (tmp_path / "a" / "model.png").stat().st_size > 10_000 and "| claim |" in (tmp_path / "a" / "model.md").read_text()
    # Ctrl-C in the accuracy/speed phase (minutes on a real model): the memory table and how to finish
    from kvcache_repro.runner import your_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(your_model, "complete", interrupted)
    capsys.readouterr()
    assert commands.call("experiment", [*argv, "--resume"]) == 130
    said = capsys.readouterr().out
    assert "6 of 6 rows measured" in said and "(partial)" in said and said.rstrip().endswith("--resume --in-process")
    # a report with nothing to plot leaves no earlier plot behind, nor a link to one
    ans = your_model.Answer(None, {}, your_model._setup(scenarios.get("cpu-tiny"), "cpu"), "-", {"speed": "made up"})
    written = your_model.report(tmp_path / "a", scenarios.get("cpu-tiny"), [], ans, log=lambda line: None)
    assert not (tmp_path / "a" / "model.png").exists() and "model.png" not in (tmp_path / "a" / "model.md").read_text()
    assert [p.name for p in written] == ["model.md", "model.json"]


def test_a_backend_that_fails_is_a_row_that_says_why_and_the_rest_completes(monkeypatch):
    """your_model.answer on the tiny Llama: hqq4's accuracy and quanto4's speed raise; each is a
    failure naming the phase, the backend and the error, and every other number is measured."""
    import dataclasses

    from kvcache_repro.backends import generation
    from kvcache_repro.measure import quality
    from kvcache_repro.runner import your_model

    scenario = dataclasses.replace(scenarios.get("cpu-tiny"), backends=("none", "quanto4", "hqq4"))
    teacher_forced, generate = quality.teacher_forced_quality, generation.generate

    def refuse_hqq4(model, ids, spec, *args, **kwargs):
        if spec.name == "hqq4":
            raise ValueError("hqq4 refused by this release (made up)")
        return teacher_forced(model, ids, spec, *args, **kwargs)

    def refuse_quanto4(model, ids, spec, *args, **kwargs):
        if spec.name == "quanto4":
            raise RuntimeError("quanto4 kernel missing (made up)")
        return generate(model, ids, spec, *args, **kwargs)
    monkeypatch.setattr(quality, "teacher_forced_quality", refuse_hqq4)
    monkeypatch.setattr(your_model.generation, "generate", refuse_quanto4)
    monkeypatch.setattr(your_model, "SPEED_NEW", 24)
    ans = your_model.answer(scenario, None, log=lambda line: None)
    assert ans.failures == {"accuracy hqq4": "ValueError: hqq4 refused by this release (made up)",
                            "speed quanto4": "RuntimeError: quanto4 kernel missing (made up)"}
    assert set(ans.accuracy.results) == {"quanto4"} and set(ans.speed) == {"hqq4"}
    table = your_model.table(scenario, [], ans)
    assert "accuracy hqq4: FAILED: ValueError" in table and "speed quanto4: FAILED: RuntimeError" in table


def test_a_first_run_records_your_model_s_entries_only_when_nothing_failed(tmp_path, monkeypatch):
    """A backend whose accuracy or speed failed, or a failed memory verdict: no entry is recorded
    from that run (they stay missing: the run fails); a clean run records them."""
    from kvcache_repro.runner import your_model
    from kvcache_repro.verdicts import comparison, paths

    class Measured:  # what your_model.answer returns, as far as complete() reads it
        def __init__(self, failures):
            self.failures = failures

        def ratios(self, ratio):
            return [ratio("quanto4", 2, "kl", 0.01, 0, 0), ratio("quanto4", 1, "decode_time_ratio", 1.3, 0, 0)]

    monkeypatch.setattr(baseline_file, "BASELINE_DIR", tmp_path)
    scenario = _scenario()
    bad = comparison.Verdict("quanto4/b2/peak_allocated", 0.9, 0.5, 0.05, "regression")
    for failures, verdicts, status in (({"speed hqq4": "RuntimeError: made up"}, [], "missing"),
                                       ({}, [bad], "missing"), ({}, [], "recorded")):
        monkeypatch.setattr(your_model, "answer", lambda *args, **kwargs: Measured(failures))
        run = experiment.ExperimentRun(scenario, [], [], list(verdicts))
        your_model.complete(run, scenario, log=lambda line: None)
        assert {v.status for v in run.verdicts[len(verdicts):]} == {status}, (failures, verdicts)
        assert paths.recorded_path(scenario.name).exists() == (status == "recorded")


def test_an_error_in_the_speed_phase_keeps_the_accuracy_measured(monkeypatch):
    import dataclasses

    from kvcache_repro.runner import your_model

    scenario = dataclasses.replace(scenarios.get("cpu-tiny"), backends=("none", "quanto4"))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the unquantized run (made up)")
    monkeypatch.setattr(your_model, "_speed", broken)
    ans = your_model.answer(scenario, None, log=lambda line: None)
    assert set(ans.accuracy.results) == {"quanto4"} and ans.speed == {}
    assert ans.failures == {"speed": "RuntimeError: out of memory in the unquantized run (made up)"}
    assert ans.speed_setup.describe().endswith("1 thread, CPU time")


def test_the_speed_claims_on_your_model_are_decided_on_the_seed_s_two_backends():
    """quanto2 faster than none (made up) does not flip 'quantization slows decoding': the seed
    said it of quanto and HQQ, and the built-in setups decide it on quanto4 and hqq4."""
    from kvcache_repro.measure.speed import SpeedRatio
    from kvcache_repro.runner import your_model

    speed = {name: SpeedRatio(name, r, (r, r), 10.0, 4) for name, r in
             (("quanto4", 1.3), ("hqq4", 1.6), ("quanto2", 0.9))}
    ans = your_model.Answer(None, speed, your_model._setup(scenarios.get("cpu-tiny"), "cpu"), "-")
    decided, _ = your_model.decided_claims(scenarios.get("cpu-tiny"), [], ans)
    verdicts = {c.claim_id: c.verdict for c in decided}
    assert verdicts == {"hqq_slower_than_quanto": "holds", "quantization_slows_decoding": "holds"}, verdicts
