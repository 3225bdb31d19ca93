"""Every subcommand explains its inputs and outputs in --help."""

from __future__ import annotations

import pytest

from pipeline.cli import main

COMMANDS = [
    "demo",
    "make-demo-data",
    "ingest",
    "episodes",
    "meta-train",
    "adapt",
    "predict",
    "evaluate",
    "run",
    "gc",
    "ui",
]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"fewscan {cmd}" in out
    assert len(out.split()) > 30  # a real description, not just a usage line


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
