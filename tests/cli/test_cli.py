import subprocess
import sys

import pytest

from sorakit.cli import main

STAGES = ["toyworld", "ingest", "inspect", "caption", "expand", "encode", "sample", "extend", "interpolate", "edit"]
GROUPS = {"train": ["vae", "captioner", "dit"], "vae": ["reconstruct", "eval"], "captioner": ["eval"], "eval": ["toyworld"]}


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in STAGES + list(GROUPS):
        assert name in out, name


@pytest.mark.parametrize("argv", [[s] for s in STAGES] + [[g, c] for g, cs in GROUPS.items() for c in cs])
def test_every_command_explains_its_options(argv, capsys):
    assert main(argv + ["--help"]) == 0
    assert "--help" in capsys.readouterr().out


def test_console_script_usage_error_exits_2():
    r = subprocess.run([sys.executable, "-m", "sorakit", "no-such-stage"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "no-such-stage" in r.stderr


def test_version(capsys):
    assert main(["--version"]) == 0
    assert "sorakit" in capsys.readouterr().out
