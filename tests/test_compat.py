"""The compatibility runner's pure parts: the requirements it builds for a version and the
table it writes from pytest's junit XML."""
from __future__ import annotations

from kvcache_repro import compat

PINNED = ["torch==2.13.0", "transformers==5.24.0", "optimum-quanto==0.2.7", "hqq==0.2.8.post1"]


def test_requirements_swap_transformers_and_keep_the_rest():
    assert compat.requirements_for("4.57.6", PINNED) == [
        "torch==2.13.0", "transformers==4.57.6", "optimum-quanto==0.2.7", "hqq==0.2.8.post1"]


def test_old_transformers_gets_the_quanto_it_needs():
    """FACTS.md: transformers 4.46 needs optimum-quanto 0.2.4."""
    assert "optimum-quanto==0.2.4" in compat.requirements_for("4.46.3", PINNED)


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
    groups = compat.outcomes_by_group(path)
    assert dict(groups["test_a"]) == {"passed": 1, "failed": 1, "skipped": 1}
    assert dict(groups["test_b"]) == {"xfailed": 1, "xpassed": 1, "error": 1}
    section = compat.markdown_section("4.57.6", {"transformers": "4.57.6"}, 12.0, groups, "2026-11-29")
    assert section.startswith("## transformers 4.57.6 - 3 FAILED")
    assert "| test_a | 1 | 1 | 0 | 1 | 0 | 0 |" in section


def test_all_passed_only_when_nothing_failed(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="t"/></testsuite></testsuites>')
    assert "all passed" in compat.markdown_section("5.24.0", {}, 1.0, compat.outcomes_by_group(path), "d")


def test_a_version_pytest_refused_is_a_row_not_a_crash(tmp_path):
    groups = compat.outcomes_by_group(tmp_path / "missing.xml")
    assert groups == {}
    assert "NO TESTS RAN" in compat.markdown_section("4.46.3", {}, 3.0, groups, "d")
