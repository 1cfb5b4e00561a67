"""The scenarios as data (kvcache_repro/measure/scenarios.toml): what the file gives, how a
scenario file is validated, and a user's own file (KVQ_SCENARIOS)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from kvcache_repro.measure import scenarios

# sha256 of every built-in scenario and its dry run (to_json, keys sorted). A meant change
# changes the measurements too: re-record the scenario's baselines and update this.
DIGEST = "98d257b42831a3cd9b971867f5961b1836ec858251e270871f14368b819e52ae"

VALID = """[mine]
device = "cpu"
model = "tiny"
batch_sizes = [1, 4]
new_tokens = 8
settings = {q_group_size = 32, residual_length = 16}
dtype = "float32"
"""


def test_the_shipped_file_gives_the_scenarios_as_they_were():
    names = list(scenarios.load(scenarios.DATA))
    names += [n + scenarios.DRY_SUFFIX for n in names]
    data = json.dumps({n: scenarios.to_json(scenarios.get(n)) for n in names}, sort_keys=True)
    assert hashlib.sha256(data.encode()).hexdigest() == DIGEST


def _write(tmp_path, text):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


D, M, B, N = 'dtype = "float32"', 'model = "tiny"', "batch_sizes = [1, 4]", "new_tokens = 8"


# id: (text replaced in VALID, its replacement, what the error says after "field ")
INVALID = {
    "unknown-field": (D, D + '\ncolour = "red"', "'colour': unknown field; allowed: device, model"),
    "missing-field": (D, "", r"'dtype': missing; allowed: .*required: .*dtype\)"),
    "wrong-type": (N, 'new_tokens = "8"', "'new_tokens': '8' is the wrong type; allowed: int"),
    "new-tokens-zero": (N, "new_tokens = 0", "'new_tokens': 0 is not positive"),
    "unknown-dtype": (D, 'dtype = "float64"', "'dtype': unknown 'float64'; allowed: float16, bfloat16"),
    "unknown-backend": (M, M + '\nbackends = ["none", "quanto3"]',
                        "'backends': unknown 'quanto3'; allowed: none,"),
    "unknown-arch": (M, 'model = "random"\narch = "llama9"',
                     "'arch': unknown architecture 'llama9'; allowed: NAME"),
    "random-without-arch": (M, 'model = "random"', "'arch': missing"),
    "batch-zero": (B, "batch_sizes = [1, 0]", r"'batch_sizes': \[1, 0\] is not positive; allowed: positive"),
    "batch-float": (B, "batch_sizes = [1, 2.5]", "'batch_sizes': .* wrong type; allowed: list of int"),
    "batch-bool": (B, "batch_sizes = [true]", "'batch_sizes': .* wrong type; allowed: list of int"),
    "batch-empty": (B, "batch_sizes = []", "'batch_sizes': .* not positive; allowed: .*at least one"),
    "batch-not-list": (B, "batch_sizes = 4", "'batch_sizes': 4 is the wrong type"),
    "unknown-setting": ("q_group_size = 32", "q_group = 32",
                        "'settings': unknown 'q_group'; allowed: q_group_size"),
    "unknown-test": (D, D + '\ntests = ["experimnet"]', "'tests': unknown 'experimnet'; allowed: experiment"),
    "tokens-at-other-batch": (N, N + "\nnew_tokens_at = {3 = 8}", "'new_tokens_at': '3' is not one of batch_sizes"),
    "tokens-at-zero": (N, N + "\nnew_tokens_at = {1 = 0}", "'new_tokens_at': .* is not positive"),
    "tokens-at-not-int": (N, N + '\nnew_tokens_at = {1 = "2"}', "'new_tokens_at': .* wrong type"),
    "tokens-at-on-cuda": ('device = "cpu"', 'device = "cuda"\nnew_tokens_at = {1 = 2}',
                          "'new_tokens_at': a CUDA scenario's GPU predictions and claims take one length"),
}


@pytest.mark.parametrize("old, new, message", INVALID.values(), ids=INVALID)
def test_an_invalid_entry_names_the_file_scenario_and_field(tmp_path, old, new, message):
    path = _write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(scenarios.ScenarioError, match="field " + message) as raised:
        scenarios.load(path, scenarios.SCENARIOS)
    assert str(raised.value).startswith(f"{path}: scenario 'mine', field ")


def test_new_tokens_at_overrides_the_length_at_its_batch_and_survives_json(tmp_path):
    """The main job's one short prompt beside its long large batch: what a worker is handed back."""
    entry = scenarios.load(_write(tmp_path, VALID.replace(N, N + "\nnew_tokens_at = {1 = 2}")))["mine"]
    mine = scenarios.from_json({"backends": scenarios.SEED_BACKENDS, **entry, "name": "mine"})
    assert (mine.tokens(1), mine.tokens(4)) == (2, 8)
    assert scenarios.from_json(json.loads(json.dumps(scenarios.to_json(mine)))) == mine
    cpu = scenarios.get("cpu")
    assert cpu.tokens(1) < cpu.settings.residual_length < cpu.tokens(cpu.large_batch)  # few tokens vs flushes


def test_a_file_never_redefines_a_built_in_scenario(tmp_path):
    path = _write(tmp_path, VALID.replace("[mine]", "[cpu-tiny]"))
    with pytest.raises(scenarios.ScenarioError, match="scenario 'cpu-tiny' is already defined .*built in"):
        scenarios.load(path, scenarios.SCENARIOS)


def test_a_file_that_is_no_toml_names_itself(tmp_path):
    path = _write(tmp_path, "[mine\n")
    with pytest.raises(scenarios.ScenarioError, match=f"{path}: not a readable TOML scenario file"):
        scenarios.load(path)


def _in_child(env_value, code):
    env = {**os.environ, scenarios.USER_ENV: str(env_value)}
    return subprocess.run([sys.executable, "-c", "from kvcache_repro.measure import scenarios\n" + code],
                          env=env, capture_output=True, text=True, timeout=120)


def test_a_user_file_adds_scenarios_that_get_returns(tmp_path):
    """In a fresh process, as ./kvq experiment and every worker read it; still torch-free."""
    path = _write(tmp_path, VALID + 'tests = ["experiment"]\nnotes = "mine"\n')
    child = _in_child(path, "import json, sys; s = scenarios.get('mine')\n"
                            "print(json.dumps([scenarios.to_json(s), scenarios.get('mine-dry').name,"
                            " scenarios.for_tests('experiment')[-1], 'torch' in sys.modules]))")
    assert child.returncode == 0, child.stderr
    data, dry, tested, torch_loaded = json.loads(child.stdout)
    assert data == {**data, "name": "mine", "device": "cpu", "batch_sizes": [1, 4], "new_tokens": 8, "notes": "mine",
                    "backends": list(scenarios.SEED_BACKENDS), "settings": {"q_group_size": 32, "residual_length": 16}}
    assert (dry, tested, torch_loaded) == ("mine-dry", ["mine", []], False)


def test_an_invalid_user_file_stops_the_import_naming_it(tmp_path):
    path = _write(tmp_path, VALID.replace("[1, 4]", "[1, -4]"))
    child = _in_child(path, "")
    assert child.returncode != 0 and f"ScenarioError: {path}: scenario 'mine', field 'batch_sizes'" in child.stderr
