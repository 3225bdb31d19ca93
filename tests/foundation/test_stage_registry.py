"""The StageSpec table (pipeline/stage_configs.py) is the one place that lists the stages: the CLI's
commands, the chain, the stage runner, the stage modules and the docs' stage table agree with it, and the
code that used to special-case a stage by name reads a field instead (issue 16 item 3)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import stage_configs
from pipeline.cli import COMMANDS, build_parser
from pipeline.stage_configs import ORDER, SPECS, chain_stages, spec

ROOT = Path(__file__).resolve().parents[2]
STAGE_NAMES = set(ORDER)


def _subparsers(argv: list[str]) -> dict[str, argparse.ArgumentParser]:
    parser = build_parser(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _one_line_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: str(a.help) for a in sub._choices_actions}


def test_every_stage_is_a_command_with_the_help_of_its_spec() -> None:
    subs = _subparsers([])
    assert [c for c in subs if c in STAGE_NAMES] == list(ORDER)  # in chain order
    short = _one_line_help(build_parser([]))
    for s in SPECS:
        assert s.name in COMMANDS
        assert subs[s.name].description == s.description
        assert short[s.name] == s.summary


def test_the_command_line_flags_follow_the_spec_fields() -> None:
    for s in SPECS:
        flags = {o: a for a in _subparsers([s.name])[s.name]._actions for o in a.option_strings}
        assert ("--resume" in flags) == s.resumable, s.name
        # `--from` picks the one upstream run of a suite command; ingest has none, adapt takes --model
        assert ("--from" in flags) == (s.cli_input == "suite"), s.name
        if s.cli_input == "suite":
            assert f"the {s.upstream[0]} run to consume" in str(flags["--from"].help)
        assert ("--model" in flags) == (s.cli_input == "model"), s.name
        assert f"--set {s.set_example}" in str(flags["--set"].help)
        assert ("manifest" in str(flags["--set"].help)) == s.per_dataset, s.name


def test_the_chain_runs_the_stages_in_order_with_optional_ones_only_when_configured() -> None:
    optional = {s.name for s in SPECS if s.optional}
    assert optional == {"adapt"}
    assert chain_stages(SimpleNamespace(adapt=None)) == [s for s in ORDER if s not in optional]
    assert chain_stages(SimpleNamespace(adapt={"support": "x"})) == list(ORDER)


def test_the_derived_views_are_the_table() -> None:
    assert stage_configs.UPSTREAM == {s.name: s.upstream for s in SPECS}
    assert stage_configs.SECTIONS == {s.name: s.section for s in SPECS if s.section}
    assert stage_configs.PACKAGES == {s.name: s.package for s in SPECS}
    assert spec("meta-train").entry_module == "pipeline.metatrain.stage"
    assert spec("meta-train").options_module == "pipeline.metatrain.options"
    with pytest.raises(KeyError, match="unknown stage 'evalute'; stages: ingest, episodes, meta-train"):
        spec("evalute")


def test_a_link_to_a_later_or_unknown_stage_is_refused_at_import() -> None:
    first, second = SPECS[0], SPECS[1]
    backwards = dataclasses.replace(first, upstream=(second.name,))
    with pytest.raises(ValueError, match=f"stage '{first.name}': upstream '{second.name}' is not an earlier"):
        stage_configs._check_links((backwards, second))
    two = dataclasses.replace(second, upstream=(first.name, first.name))
    with pytest.raises(ValueError, match="exactly one upstream"):
        stage_configs._check_links((first, two))


def test_the_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SPECS[0].upstream = ("x",)  # type: ignore[misc]


def test_the_stage_modules_do_not_restate_their_links() -> None:
    """A stage module may not carry its own copy of a registry fact (it had UPSTREAM, unread)."""
    for s in SPECS:
        path = ROOT / Path(*s.entry_module.split(".")).with_suffix(".py")
        tree = ast.parse(path.read_text())
        assigned = {
            t.id
            for node in tree.body
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)
        }
        restated = assigned & {"UPSTREAM", "SECTION", "ORDER"}
        assert not restated, f"{path} restates {restated}: the StageSpec table holds them"


def test_no_stage_is_special_cased_by_name_where_the_table_is_read() -> None:
    """`stage == "meta-train"` (torchrun, --resume, system metrics) and the like are fields now."""
    orchestration = ["pipeline/cli.py", "pipeline/stages.py", "pipeline/chain.py", "pipeline/suite.py"]
    orchestration += ["pipeline/gc_runs.py", "pipeline/status.py"]
    orchestration += sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline/tracking").glob("*.py"))
    for rel in orchestration:
        tree = ast.parse((ROOT / rel).read_text())
        named = [
            (node.lineno, c.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Compare)
            for c in (node.left, *node.comparators)
            if isinstance(c, ast.Constant) and c.value in STAGE_NAMES
        ]
        assert not named, f"{rel} compares a stage name: {named}"


def test_every_stage_module_is_type_checked_against_the_protocol() -> None:
    text = (ROOT / "pipeline/stages.py").read_text()
    for s in SPECS:
        assert re.search(rf"from {re.escape(s.package)} import stage as _\w+", text), s.name


def _doc_stage_rows() -> list[list[str]]:
    text = (ROOT / "docs/ARCHITECTURE.md").read_text()
    section = text.split("## Five stages", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| stage | package | reads |")
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


def test_the_docs_stage_table_agrees_with_the_registry() -> None:
    rows = _doc_stage_rows()
    assert [r[0] for r in rows] == list(ORDER)
    assert len(ORDER) == 5  # the heading says "Five stages"
    for row in rows:
        s = spec(row[0])
        assert row[1].startswith(f"`{s.package.replace('.', '/')}/`"), row
        reads = row[2]
        if s.per_dataset:
            assert "data manifest" in reads, row
        for up in s.upstream:
            assert re.search(rf"\ban? {re.escape(up)} run", reads), (row, up)
