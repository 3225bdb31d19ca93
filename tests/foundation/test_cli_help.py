"""Every subcommand explains its inputs and outputs in --help."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml

from pipeline.cli import build_parser, main
from pipeline.errors import ConfigError
from pipeline.suite import load_manifest, load_suite

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
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare word sequences
    assert f"fewscan {cmd}" in out
    # a real description, and every input explained: each argument has its own help text, shown
    sub = next(a for a in build_parser([cmd, "--help"])._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[cmd]
    assert p.description and " ".join(p.description.split())[:60] in out, cmd
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        assert action.help and action.help != argparse.SUPPRESS, f"fewscan {cmd}: {name} has no help"
        assert str(name) in out and " ".join(str(action.help).split())[:40] in out, (cmd, name)


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def _help(cmd: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("cmd", ["ingest", "episodes", "meta-train", "adapt", "evaluate", "run"])
def test_each_set_example_is_valid_for_its_command(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The `--set` example of each command's help parses, validates against that command's config (the
    data manifest for ingest, the stage's suite section, the whole suite for run) and sets what it says."""
    m = re.search(r"e\.g\.\s+--set\s+(\S+)", _help(cmd, capsys))
    assert m, f"no --set example in `fewscan {cmd} --help`"
    example = m.group(1)
    key, _, raw = example.partition("=")
    want = yaml.safe_load(raw)
    if cmd == "ingest":
        got = load_manifest("demo_quick", [example]).model_dump()
    elif cmd == "run":
        got = load_suite("demo_quick", [example]).raw
    else:
        got = load_suite("demo_quick").stage_config(cmd, [example]).model_dump()
    for part in key.split("."):
        got = got[part]
    assert got == want


def test_the_old_set_example_is_refused_where_it_was_wrong() -> None:
    """k_shot is an episodes key only: the help example every command used to show fails elsewhere."""
    suite = load_suite("demo_quick")
    assert suite.stage_config("episodes", ["k_shot=[1,5]"]).k_shot == [1, 5]
    for stage in ("meta-train", "adapt", "evaluate"):
        with pytest.raises(ConfigError, match="unknown key 'k_shot'"):
            suite.stage_config(stage, ["k_shot=[1,5]"])


@pytest.mark.parametrize(
    ("typed", "meant"), [("evalute", "evaluate"), ("metatrain", "meta-train"), ("injest", "ingest")]
)
def test_a_mistyped_command_gets_a_suggestion(
    typed: str, meant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main([typed, "demo"])
    assert e.value.code == 2
    assert f"invalid choice: '{typed}'; did you mean '{meant}'?" in capsys.readouterr().err


def test_a_command_unlike_any_gets_the_list_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["zzzz"])
    err = capsys.readouterr().err
    assert "invalid choice: 'zzzz'" in err and "did you mean" not in err and "evaluate" in err


def test_a_mistyped_choice_of_an_option_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["episodes", "demo", "--on-insufficient", "dorp"])
    assert "did you mean 'drop'?" in capsys.readouterr().err
