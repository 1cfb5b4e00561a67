"""The compatibility runner's pure parts: the requirements it builds for a version and the
table it writes from pytest's junit XML."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvcache_repro.releases import compat, package_specs, results

PINNED = ["torch==2.13.0", "transformers==5.24.0", "optimum-quanto==0.2.7", "hqq==0.2.8.post1"]
PINS = dict(line.split("==") for line in PINNED)


def test_requirements_swap_transformers_and_keep_the_rest():
    assert package_specs.requirements_for("4.57.6", PINNED) == [
        "torch==2.13.0", "transformers==4.57.6", "optimum-quanto==0.2.7", "hqq==0.2.8.post1"]


def test_old_transformers_gets_the_quanto_it_needs():
    """docs/facts.md: transformers 4.46 needs optimum-quanto 0.2.4."""
    assert "optimum-quanto==0.2.4" in package_specs.requirements_for("4.46.3", PINNED)


JUNIT = """<?xml version="1.0"?><testsuites><testsuite>
<testcase classname="tests.test_a" name="t1"/>
<testcase classname="tests.test_a" name="t2"><failure message="assert got == expected"/></testcase>
<testcase classname="tests.test_a" name="t3"><skipped type="pytest.skip" message="no CUDA device"/></testcase>
<testcase classname="tests.test_b" name="t4"><skipped type="pytest.xfail" message="#48700"/></testcase>
<testcase classname="tests.test_b" name="t5"><failure message="[XPASS(strict)] #48700"/></testcase>
<testcase classname="tests.test_b" name="t6"><error message="fixture failed"/></testcase>
</testsuite></testsuites>"""


def test_junit_outcomes_per_group(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(JUNIT)
    groups = results.outcomes_by_group(compat.read_junit(path))
    assert dict(groups["test_a"]) == {"passed": 1, "failed": 1, "skipped": 1}
    assert dict(groups["test_b"]) == {"xfailed": 1, "xpassed": 1, "error": 1}
    assert compat.read_junit(tmp_path / "missing.xml") == []  # pytest refused the version: no rows


# ---- failure kinds, read back from junit -------------------------------------------------

KINDS_JUNIT = """<?xml version="1.0"?><testsuites><testsuite>
<testcase classname="tests.test_model_families" name="test_f[mistral-quanto4]"><failure message="AssertionError: [behaviour] transformers 5.5.4 behaves differently from the table for &gt;=5.0.0,&lt;6.0.0: FAMILY_SUPPORT[mistral] expects 'rejected'"/></testcase>
<testcase classname="tests.test_model_families" name="test_f[dbrx-hqq4]"><skipped type="pytest.skip" message="[harness] the harness cannot drive transformers 5.5.4: building the tiny dbrx config failed"/></testcase>
<testcase classname="tests.test_model_families" name="test_f[llama-hqq4]"/>
<testcase classname="tests.test_memory_experiment" name="test_ratios_within_baseline_bands[cpu-tiny]"><failure message="quanto4 peak ratio 0.9 outside 1.01 +/- 0.001"/></testcase>
<testcase classname="tests.test_cache_semantics" name="test_x"><failure message="assert 3 == 4"/></testcase>
<testcase classname="tests.test_cache_semantics" name="test_y"><skipped type="pytest.skip" message="no CUDA device"/></testcase>
<testcase classname="tests.test_version_expectations" name="test_beam"><failure message="[XPASS(strict)] #48700"/></testcase>
<testcase classname="tests.test_version_expectations" name="test_cfg"><skipped type="pytest.xfail" message="#48700"/></testcase>
</testsuite></testsuites>"""


def test_failures_are_classified_by_whose_fault_they_are(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(KINDS_JUNIT)
    kinds = {c["name"]: c["kind"] for c in compat.read_junit(path)}
    assert kinds == {
        "test_f[mistral-quanto4]": "behaviour",  # the table is wrong for this release
        "test_f[dbrx-hqq4]": "harness",  # a skip, but the release went unchecked: counted
        "test_f[llama-hqq4]": None,
        "test_ratios_within_baseline_bands[cpu-tiny]": "band",
        "test_x": "unclassified",
        "test_y": None,  # a plain skip is not a problem
        "test_beam": "behaviour",  # an xpass: a pinned bug no longer shows
        "test_cfg": None,
    }


def _run(release, cases=(), installed=True, groups=("test_a", "test_b")):
    return compat.summarize(release, list(cases), installed=installed, groups_run=groups,
                            install_error="" if installed else "ERROR: No matching distribution found for transformers==9.9",
                            versions={"transformers": release}, date="d", pytest_rc=0)


def _case(group, outcome="passed", kind=None, name="t", message=""):
    return {"group": group, "name": name, "outcome": outcome, "message": message, "kind": kind}


def test_matrix_has_releases_as_rows_in_version_order_and_groups_as_columns():
    runs = [_run("5.10.4", [_case("test_a"), _case("test_b", "failed", "behaviour", message="[behaviour] x")]),
            _run("5.5.4", [_case("test_a"), _case("test_a", "skipped", "harness", message="[harness] y"),
                           _case("test_b", "xfailed")]),
            _run("9.9", installed=False),
            _run("5.24.0", [_case("test_a")], groups=("test_a",))]
    table = results.matrix_table(runs, PINS).splitlines()
    assert table[0] == "| spec | differs from the pins | verdict | decode time vs pin | a | b |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["5.5.4", "5.10.4", "5.24.0", "9.9"]
    assert table[2] == "| 5.5.4 | transformers 5.5.4 | 1 harness | not run | **1**: 1 harness / 2 | ok 0 (1 xfailed) |"
    assert table[3] == "| 5.10.4 | transformers 5.10.4 | 1 behaviour | not run | ok 1 | **1**: 1 behaviour / 1 |"
    assert table[4] == "| 5.24.0 | the pins | passes | not run | ok 1 | not run |"
    assert table[5].startswith("| 9.9 | - | cannot install: ERROR: No matching distribution")


def test_results_file_has_the_matrix_and_one_section_per_release(tmp_path):
    import json

    runs = tmp_path / "runs"
    runs.mkdir()
    for run in (_run("5.0.0", [_case("test_a", "failed", "behaviour", "t1", "[behaviour] FAMILY_SUPPORT[mistral]")]),
                _run("4.0.0", installed=False)):
        (runs / f"{run['release']}.json").write_text(json.dumps(run))
    text = results.write_results(runs, tmp_path / "RESULTS.md")
    assert text.index("## Matrix") < text.index("### transformers 4.0.0") < text.index("### transformers 5.0.0")
    assert "behaviour (1):" in text and "FAMILY_SUPPORT[mistral]" in text
    assert "Could not install" in text and (tmp_path / "RESULTS.md").read_text() == text


def test_a_release_that_cannot_install_is_remembered_and_a_built_one_is_reused(tmp_path, monkeypatch):
    from kvcache_repro.releases import compat_envs

    monkeypatch.setenv("KVQ_COMPAT_ENVS", str(tmp_path))
    base = tmp_path / f"base-{compat_envs.requirements_hash()}"
    (base / "bin").mkdir(parents=True)
    (base / ".kvq-complete").write_text("ok\n")
    calls = []

    def fake_run(cmd, log, cwd=None):
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            compat_envs._site_packages(Path(cmd[3])).mkdir(parents=True)
            (Path(cmd[3]) / "bin").mkdir(exist_ok=True)
            (Path(cmd[3]) / "bin" / "python").write_text("")
            return True
        log.write_text("ERROR: No matching distribution found for transformers==9.9.9\n")
        return "transformers==9.9.9" not in cmd

    monkeypatch.setattr(compat_envs, "_run", fake_run)
    env = compat_envs.spec_env(package_specs.parse("9.9.9"))
    assert env.python is None and "No matching distribution" in env.error
    n = len(calls)
    assert compat_envs.spec_env(package_specs.parse("9.9.9")).python is None and len(calls) == n  # no second pip
    ok = compat_envs.spec_env(package_specs.parse("5.24.0"))
    assert ok.python is not None and (ok.path / ".kvq-complete").exists()
    n = len(calls)
    assert compat_envs.spec_env(package_specs.parse("5.24.0")).python == ok.python and len(calls) == n  # cached
    assert "site.addsitedir" in (compat_envs._site_packages(ok.path) / "_kvq_base.pth").read_text()


def test_a_full_tier_run_is_its_own_row_and_file():
    full = _run("5.17.0", [_case("test_a"), _case("test_memory_experiment", "failed", "band", "test_ratios")],
                groups=("the whole tier",))
    groups = _run("5.17.0", [_case("test_a")], groups=("test_a",))
    assert (compat.run_file(full), compat.run_file(groups)) == ("5.17.0-full.json", "5.17.0.json")
    rows = results.matrix_table([full, groups], PINS).splitlines()[2:]
    assert rows[0].startswith("| 5.17.0 | transformers 5.17.0 | passes |")
    assert rows[1].startswith("| 5.17.0 (full tier) | transformers 5.17.0 | 1 band |")


# ---- exit codes a CI acts on ---------------------------------------------------------------

def _speed(verdict="not distinguishable", error=None):
    return {"error": error} if error else {"verdicts": {"quanto4": {"ratio": 1.3, "blocks": [1.3], "verdict": verdict}}}


@pytest.mark.parametrize("runs,code", [
    ([_run("5.25.0", [_case("test_a"), _case("test_b", "xfailed")])], 0),  # an xfail is recorded for its release
    ([_run("5.25.0", [_case("test_a", "failed", "band")])], 1),
    ([_run("5.25.0", [_case("test_a", "failed", "behaviour")])], 1),
    ([_run("5.25.0", [_case("test_a", "failed", "unclassified")])], 1),
    ([_run("5.25.0", [])], 1),  # pytest ran nothing
    ([{**_run("5.25.0", [_case("test_a")]), "speed": _speed("slower")}], 1),
    ([{**_run("5.25.0", [_case("test_a")]), "speed": _speed("faster")}], 0),
    ([_run("9.9", installed=False)], 3),
    ([_run("5.5.4", [_case("test_a", "skipped", "harness")])], 3),
    ([{**_run("5.25.0", [_case("test_a")]), "speed": _speed(error="worker died")}], 3),
    ([{**_run("5.25.0", [_case("test_a")]), "pytest_rc": 3}], 3),  # an INTERNALERROR after the junit
    ([_run("9.9", installed=False), _run("5.25.0", [_case("test_a", "failed", "band")])], 1),  # 1 is never hidden
])
def test_the_exit_code_says_whether_a_release_broke_something(runs, code):
    assert compat.exit_code(runs) == code


PINS4 = {"transformers": "5.24.0", "torch": "2.13.0", "optimum-quanto": "0.2.7", "hqq": "0.2.8.post1"}


def _rows(found):
    return {row.spec.label: row.stands_for for row in package_specs.latest(PINS4, {**PINS4, **found})}


def test_latest_checks_each_new_release_alone_and_all_together():
    assert _rows({"transformers": "5.25.0", "torch": "2.15.0"}) == {
        "5.25.0": ("transformers",), "torch-2.15.0": ("torch",), "5.24.0": ("optimum-quanto", "hqq"),
        "transformers-5.25.0+torch-2.15.0": ("all together",)}


def test_latest_with_one_new_release_checks_it_once_and_the_pins_once():
    assert _rows({"torch": "2.15.0"}) == {"5.24.0": ("transformers", "optimum-quanto", "hqq"),
                                          "torch-2.15.0": ("torch", "all together")}
    assert _rows({"torch": "2.13.0+cpu"}) == {"5.24.0": ("transformers", "torch", "optimum-quanto", "hqq",
                                                         "all together")}


def test_newest_reads_pip_index_and_names_the_way_out_when_it_cannot(monkeypatch):
    import subprocess

    answers = {"ok": (0, "hqq (0.2.8.post1)\nAvailable versions: 0.2.8.post1, 0.2.8\n", ""),
               "down": (1, "", "ERROR: Could not find a version that satisfies the requirement hqq")}
    state = {}
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: (state.setdefault("cmd", cmd), subprocess.CompletedProcess(
        cmd, *answers[state["answer"]]))[1])
    state["answer"] = "ok"
    assert package_specs.newest("hqq", pre=True) == "0.2.8.post1" and "--pre" in state["cmd"]
    state["answer"] = "down"
    with pytest.raises(package_specs.IndexUnreachable, match="newest hqq .*Could not find.*by hand"):
        package_specs.newest("hqq")


# ---- --accept: only a band miss of one release is accepted ---------------------------------

def test_accept_refuses_anything_but_band_misses_of_one_release(monkeypatch):
    from kvcache_repro.releases import compat_envs

    said = []
    monkeypatch.setattr(compat_envs, "spec_env", lambda *a: pytest.fail("no environment for a refused accept"))
    behaviour = _run("5.26.0", [_case("test_a", "failed", "band"), _case("test_b", "failed", "behaviour", "t2")])
    assert compat.accept_spec(package_specs.parse("5.26.0"), behaviour, log=said.append) == 1
    assert "test_b::t2 (behaviour, observed no table value)" in said[-1]
    slower = {**_run("5.26.0", [_case("test_a", "failed", "band")]), "speed": _speed("slower")}
    assert compat.accept_spec(package_specs.parse("5.26.0"), slower, log=said.append) == 1
    assert compat.accept_spec(package_specs.parse("5.26.0"), _run("5.26.0", [_case("test_a")]), log=said.append) == 1
    assert "no band or behaviour miss" in said[-1]
    assert compat.accept_spec(package_specs.parse("transformers==5.26.0,torch==2.15.0"), behaviour,
                              log=said.append) == 2
    assert compat.accept_spec(package_specs.parse("5.26.0"), None, log=said.append) == 2
    assert "run ./kvq compat 5.26.0 first" in said[-1]


def test_accept_measures_the_band_misses_again_in_the_release_environment(monkeypatch, tmp_path):
    import subprocess

    from kvcache_repro.releases import compat_envs

    env = compat_envs.Env("5.26.0", tmp_path, tmp_path / "python", tmp_path / "log")
    monkeypatch.setattr(compat_envs, "spec_env", lambda *a: env)
    calls = []
    out = "kv-accept-release: baselines/cpu-tiny.json: hqq4/b200/peak_allocated: 2.0501 -> 2.0501 [transformers 5.26.0: accepted]\n"
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: (calls.append(cmd), subprocess.CompletedProcess(cmd, 1, out, ""))[1])
    run = _run("5.26.0", [_case("test_memory_experiment", "failed", "band", "test_ratios_within_baseline_bands[cpu-tiny]")])
    said = []
    assert compat.accept_spec(package_specs.parse("5.26.0"), run, log=said.append) == 0
    assert calls[0][0] == str(tmp_path / "python") and "--kv-accept-release" in calls[0]
    assert calls[0][-1] == "tests/test_memory_experiment.py::test_ratios_within_baseline_bands[cpu-tiny]"
    assert "its row now passes" in said[-1]


def test_accept_stores_a_behaviour_miss_that_names_its_table_value_without_an_environment(monkeypatch, tmp_path):
    from kvcache_repro.releases import compat_envs
    from kvcache_repro.verdicts import expectations as ex

    monkeypatch.setattr(compat_envs, "spec_env", lambda *a: pytest.fail("a behaviour needs no environment"))
    monkeypatch.setattr(ex, "ACCEPTED_FILE", tmp_path / "expectations.json")
    miss = ex.differs(ex.MULTI_TOKEN_FLUSH, None, "16-token forwards flush later", version="5.26.0", value="later")
    twice = [_case("test_cache_semantics", "failed", "behaviour", f"t{i}", message=miss) for i in (1, 2)]
    said = []
    assert compat.accept_spec(package_specs.parse("5.26.0"), _run("5.26.0", twice), log=said.append) == 0
    assert "MULTI_TOKEN_FLUSH: 'later' from transformers 5.26.0 on" in said[0] and "now passes" in said[-1]
    assert ex.amended(ex.load_accepted())["MULTI_TOKEN_FLUSH"].lookup(version="5.26.0").value == "later"
    other = ex.differs(ex.MULTI_TOKEN_FLUSH, None, "flush earlier", version="5.26.0", value="earlier")
    both = [*twice, _case("test_cache_semantics", "failed", "behaviour", "t3", message=other)]
    assert compat.accept_spec(package_specs.parse("5.26.0"), _run("5.26.0", both), log=said.append) == 1
    assert "observed both 'earlier' and 'later'" in said[-1] or "observed both 'later' and 'earlier'" in said[-1]


def test_accept_refuses_a_behaviour_of_another_package_and_the_pin(monkeypatch, tmp_path):
    from kvcache_repro.verdicts import expectations as ex

    monkeypatch.setattr(ex, "ACCEPTED_FILE", tmp_path / "expectations.json")
    miss = ex.differs(ex.MULTI_TOKEN_FLUSH, None, "later", version="5.25.0", value="later")
    run = _run("torch-2.15.0", [_case("test_cache_semantics", "failed", "behaviour", message=miss)])
    said = []
    assert compat.accept_spec(package_specs.parse("torch==2.15.0"), run, log=said.append) == 1
    assert "a behaviour of transformers 5.25.0, not of torch 2.15.0" in said[-1]
    pin = package_specs.pinned(compat.ROOT)["transformers"]
    assert compat.accept_spec(package_specs.parse(pin), _run(pin, [_case("test_a", "failed", "band")]),
                              log=said.append) == 1
    assert f"transformers {pin} is the pin" in said[-1]
    assert not (tmp_path / "expectations.json").exists()


def test_the_command_refuses_options_that_do_not_go_together_and_an_unreachable_index(monkeypatch, capsys):
    from kvcache_repro import commands

    assert commands.call("compat", ["--pre"]) == 2 and "--pre needs --latest" in capsys.readouterr().err
    assert commands.call("compat", ["--accept", "5.26.0", "--latest"]) == 2

    def down(package, pre=False):
        raise package_specs.IndexUnreachable(f"cannot ask the package index for the newest {package}")

    monkeypatch.setattr(package_specs, "newest", down)
    assert commands.call("compat", ["--latest"]) == 2
    assert "cannot ask the package index for the newest transformers" in capsys.readouterr().err
