"""Every command-line entry answers --help completely: the whole first paragraph of what
it does (a description cut mid-sentence was the complaint), examples and exit codes; and
``./kvq help`` / ``--help`` list every command, with an unknown command exiting 2."""
from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = ["runner.experiment", "releases.compat", "gpu.device_run", "runner.spread", "verdicts.bands",
           "verdicts.release_baselines", "gpu.bundle", "backends.quanto_ext"]


@pytest.mark.parametrize("module", ENTRIES)
def test_help_is_complete_with_examples_and_exit_codes(module, capsys):
    mod = importlib.import_module(f"kvcache_repro.{module}")
    with pytest.raises(SystemExit) as exited:
        mod.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    first = " ".join(mod.__doc__.strip().split("\n\n")[0].split())
    assert first in " ".join(out.split()), "the description is not the docstring's whole first paragraph"
    assert "\nexamples:\n" in out and "\nexit codes:\n" in out
    assert first.rstrip("`").endswith((".", ":", ")")), f"{module}'s first paragraph ends mid-sentence: {first[-40:]!r}"


@pytest.mark.parametrize("arg", ["help", "--help", "-h"])
def test_kvq_help_lists_every_command_and_exits_0(arg):
    proc = subprocess.run(["bash", str(ROOT / "kvq"), arg], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    dispatched = subprocess.run(["bash", "-c", f"sed -n '/^case \"$cmd\" in/,/^esac/p' {ROOT / 'kvq'}"],
                                capture_output=True, text=True).stdout
    commands = [line.strip().split(")")[0] for line in dispatched.splitlines()[1:-1]
                if ")" in line and not line.strip().startswith(("*", "help"))]
    assert commands and all(f"./kvq {c}" in proc.stdout for c in commands), commands
    assert "Exit codes:" in proc.stdout and "Examples:" in proc.stdout


def test_an_unknown_kvq_command_exits_2_and_says_so():
    proc = subprocess.run(["bash", str(ROOT / "kvq"), "tset"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "kvq: unknown command 'tset'" in proc.stderr
