"""Release checks over every package the result depends on (issue 18): the specs
``./kvq compat`` reads, the environments it builds for them, and the matrix rows they
become. Pure parts and fakes only: real environments are built by ``./kvq compat``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvcache_repro import commands
from kvcache_repro.releases import compat, compat_envs, package_specs as ps, results

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, label, requirements", [
    ("5.17.0", "5.17.0", ["transformers==5.17.0"]),  # the label runs were stored under before specs
    ("torch==2.14.1", "torch-2.14.1", ["torch==2.14.1"]),
    ("optimum_quanto==0.2.6", "optimum-quanto-0.2.6", ["optimum-quanto==0.2.6"]),  # names normalized
    ("hqq==0.2.7.post1", "hqq-0.2.7.post1", ["hqq==0.2.7.post1"]),
    ("torch==2.11.0,transformers==5.17.0", "transformers-5.17.0+torch-2.11.0",
     ["transformers==5.17.0", "torch==2.11.0"]),  # PACKAGES order, whatever the order given
    ("transformers==5.25.0rc1", "5.25.0rc1", ["transformers==5.25.0rc1"]),  # a pre-release from the index
])
def test_specs_name_packages_and_label_their_runs(text, label, requirements):
    spec = ps.parse(text)
    assert spec.label == label
    assert [i.requirement for i in spec.items] == requirements


@pytest.mark.parametrize("text, problem", [
    ("numpy==2.0", "unknown package 'numpy'"),
    ("torch==latest", "'latest' is not a version of torch"),
    ("torch==2.11.0,torch==2.14.1", "torch is named twice"),
    ("5.17.0,", "an empty part"),
    ("transformers @ file:///nowhere/at/all", "/nowhere/at/all does not exist"),
    ("nonsense", "cannot read 'nonsense'"),
])
def test_a_spec_the_suite_cannot_run_names_the_part_and_the_forms(text, problem):
    with pytest.raises(ps.SpecError, match="Forms: 5.17.0") as error:
        ps.parse(text)
    assert problem in str(error.value)


def test_a_local_wheel_or_tree_is_a_pre_release_with_a_content_digest(tmp_path):
    wheel = tmp_path / "transformers-5.25.0.dev0-py3-none-any.whl"
    wheel.write_bytes(b"one build")
    spec = ps.parse(str(wheel))
    item = spec.items[0]
    assert (item.package, item.version, item.requirement) == ("transformers", "", f"transformers @ file://{wheel}")
    assert spec.label == f"transformers-local-{item.digest}"
    wheel.write_bytes(b"a rebuilt one")  # a new build: a new environment, never the old one reused
    assert ps.parse(str(wheel)).label != spec.label
    tree = tmp_path / "checkout"
    tree.mkdir()
    (tree / "pyproject.toml").write_text('[project]\nname = "transformers"\n')
    assert ps.parse(f"transformers @ file://{tree}").items[0].path == str(tree)
    assert ps.parse(str(tree)).items[0].package == "transformers"  # name read from pyproject.toml
    with pytest.raises(ps.SpecError, match="builds transformers, not hqq"):
        ps.parse(f"hqq @ {tree}")


def test_pins_are_read_from_requirements():
    pins = ps.pinned(ROOT)
    assert set(pins) == set(ps.PACKAGES)
    assert all(f"{k}=={v}" in (ROOT / "requirements.txt").read_text() for k, v in pins.items())


def test_a_swapped_torch_gets_its_own_quanto_so_the_extension_is_built_for_it():
    """quanto builds its extension into its own package folder: shared with the base, a
    torch 2.14 env would load the .so built against 2.13."""
    quanto = f"optimum-quanto=={ps.pinned(ROOT)['optimum-quanto']}"
    assert compat_envs.spec_requirements(ps.parse("torch==2.14.1")) == [
        ["torch==2.14.1"], ["--ignore-installed", "--no-deps", quanto]]
    assert compat_envs.spec_requirements(ps.parse("torch==2.14.1,optimum-quanto==0.2.6")) == [
        ["torch==2.14.1", "optimum-quanto==0.2.6"]]
    assert compat_envs.spec_requirements(ps.parse("hqq==0.2.7")) == [["hqq==0.2.7"]]
    assert compat_envs.spec_requirements(ps.parse("4.46.3")) == [["transformers==4.46.3", "optimum-quanto==0.2.4"]]
    assert compat_envs.env_path(ps.parse("5.17.0")).name.startswith("transformers-5.17.0-")  # envs built before
    assert compat_envs.env_path(ps.parse("torch==2.14.1")).name.startswith("spec-torch-2.14.1-")


def test_identical_large_files_are_hard_linked_between_spec_envs(tmp_path, monkeypatch):
    monkeypatch.setattr(compat_envs, "SHARE_MIN_BYTES", 4)
    site = {name: compat_envs._site_packages(tmp_path / name) for name in ("old", "new")}
    for name, libs in (("old", {"cublas.so": b"same bytes", "cudnn.so": b"cudnn 9.19"}),
                       ("new", {"cublas.so": b"same bytes", "cudnn.so": b"cudnn 9.24", "tiny": b"x"})):
        (site[name] / "nvidia").mkdir(parents=True)
        for lib, data in libs.items():
            (site[name] / "nvidia" / lib).write_bytes(data)
    said = compat_envs.share_identical(tmp_path / "new", [tmp_path / "old"])
    assert said.startswith("share_identical: 1 files")
    same, differs = (site["new"] / "nvidia" / n for n in ("cublas.so", "cudnn.so"))
    assert same.stat().st_ino == (site["old"] / "nvidia" / "cublas.so").stat().st_ino and same.read_bytes() == b"same bytes"
    assert differs.stat().st_ino != (site["old"] / "nvidia" / "cudnn.so").stat().st_ino
    assert differs.read_bytes() == b"cudnn 9.24" and os.stat(differs).st_nlink == 1


def _spec_run(text, versions, cases=({"group": "test_a", "name": "t", "outcome": "passed", "kind": None,
                                      "message": ""},)):
    spec = ps.parse(text)
    run = compat.summarize(spec.label, list(cases), groups_run=("test_a",), versions=versions, date="d", pytest_rc=0)
    run["spec"] = spec.to_json()
    return run


def test_rows_are_grouped_by_the_package_swapped_and_say_what_differs():
    pins = {"transformers": "5.24.0", "torch": "2.13.0", "optimum-quanto": "0.2.7", "hqq": "0.2.8.post1"}
    stack = {**pins, "torch": "2.13.0+cpu"}
    runs = [_spec_run("hqq==0.2.7", {**stack, "hqq": "0.2.7"}),
            _spec_run("torch==2.14.1", {**stack, "torch": "2.14.1+cu130"}),
            _spec_run("transformers==5.17.0,torch==2.11.0", {**stack, "transformers": "5.17.0", "torch": "2.11.0+cu130"}),
            _spec_run("torch==2.11.0", {**stack, "torch": "2.11.0+cu130"},
                      [{"group": "test_a", "name": "t[fp8]", "outcome": "failed", "kind": "behaviour",
                        "message": "[behaviour] fp8 gives non-finite logits"}]),
            _spec_run("5.24.0", stack)]
    rows = [r.split(" | ")[:3] for r in results.matrix_table(runs, pins).splitlines()[2:]]
    assert rows == [["| 5.24.0", "the pins", "passes"],
                    ["| torch-2.11.0", "torch 2.11.0+cu130", "1 behaviour"],
                    ["| torch-2.14.1", "torch 2.14.1+cu130", "passes"],
                    ["| hqq-0.2.7", "hqq 0.2.7", "passes"],
                    ["| transformers-5.17.0+torch-2.11.0", "transformers 5.17.0, torch 2.11.0+cu130", "passes"]]
    assert results.release_section(runs[1]).startswith("### spec torch==2.14.1")


def test_each_swapped_package_adds_the_groups_its_numbers_move():
    assert compat.groups_for(ps.parse("5.17.0"), None) == compat.DEFAULT_GROUPS
    torch_groups = compat.groups_for(ps.parse("torch==2.14.1"), None)
    assert "test_accuracy" in torch_groups and "test_quanto_lock" in torch_groups
    assert compat.groups_for(ps.parse("hqq==0.2.7"), ("test_a",)) == ("test_a", "test_accuracy", "test_seed_claims")


def test_an_unreadable_spec_stops_compat_with_exit_2(capsys):
    assert commands.call("compat", ["numpy==2.0"]) == 2
    assert "unknown package 'numpy'" in capsys.readouterr().err
