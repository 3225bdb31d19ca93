"""A failing command fails before torch or mlflow is imported (issue 18 item 3; README, "Command line").

Each case runs the real entry point, `python -X importtime -m pipeline.cli ...`, in a fresh folder, and reads
the modules it imported from `-X importtime`'s report: what is measured is the imports a command performs,
not its wall-clock time (which depends on the machine's load). Every case also checks the error text.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import COMMANDS
from pipeline.suite import REPO_ROOT

# Heavy imports a config error must not pay for (seconds of CPU each on a loaded machine).
HEAVY = ("torch", "mlflow", "monai", "pydicom", "sklearn", "pandas", "scipy", "matplotlib")


def _run(args: list[str], cwd: Path, *prefix: str) -> tuple[int, str, set[str]]:
    """Exit code, stderr without the import report, and the top-level modules imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *(prefix or ("-m", "pipeline.cli")), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    imported: set[str] = set()
    other: list[str] = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", line)
        if m:
            imported.add(m.group(1).split(".")[0])
        else:
            other.append(line)
    return proc.returncode, "\n".join(other), imported


def _assert_light(imported: set[str]) -> None:
    assert imported, "no import report: -X importtime did not run"
    assert "pipeline" in imported
    heavy = sorted(set(HEAVY) & imported)
    assert not heavy, f"imported {heavy} before failing"


def test_the_import_report_sees_a_heavy_import(tmp_path: Path) -> None:
    """The control: importing the stage registry (torch, mlflow) shows up in the report this test reads."""
    _, _, imported = _run([], tmp_path, "-c", "import pipeline.stages")
    assert {"torch", "mlflow"} <= imported


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_nothing_heavy(command: str | None, tmp_path: Path) -> None:
    rc, _, imported = _run([command, "--help"] if command else ["--help"], tmp_path)
    assert rc == 0
    _assert_light(imported)


def _suite(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _demo_suite(tmp_path: Path, extra: str = "", manifest: str | None = None) -> Path:
    """tasks/demo_quick.yaml with its manifest given by absolute path (or `manifest`), plus `extra` lines."""
    text = (REPO_ROOT / "tasks" / "demo_quick.yaml").read_text()
    dataset = manifest or str(REPO_ROOT / "data_manifests" / "demo_quick.yaml")
    text = re.sub(r"(?m)^dataset: .*$", f"dataset: {dataset}", text)
    return _suite(tmp_path, text + extra)


@pytest.mark.parametrize("command", ["episodes", "meta-train", "evaluate", "run", "status", "adapt", "gc"])
def test_a_missing_suite_file_fails_before_heavy_imports(command: str, tmp_path: Path) -> None:
    rc, err, imported = _run([command, "no_such_suite.yaml"], tmp_path)
    assert rc == 2
    assert "error: cannot find 'no_such_suite.yaml'" in err
    _assert_light(imported)


def test_a_missing_manifest_fails_before_heavy_imports(tmp_path: Path) -> None:
    rc, err, imported = _run(["ingest", "no_such_manifest.yaml"], tmp_path)
    assert rc == 2 and "error: cannot find 'no_such_manifest.yaml'" in err
    _assert_light(imported)


@pytest.mark.parametrize("command", ["meta-train", "run"])
def test_an_unknown_suite_key_fails_before_heavy_imports(command: str, tmp_path: Path) -> None:
    # meta_train's `outer:` block of the demo suite, with `steps` misspelt
    suite = _demo_suite(tmp_path)
    data = yaml.safe_load(suite.read_text())
    data["meta_train"]["outer"]["stepz"] = data["meta_train"]["outer"].pop("steps")
    suite.write_text(yaml.safe_dump(data))
    rc, err, imported = _run([command, str(suite)], tmp_path)
    assert rc == 2
    assert "unknown key 'outer.stepz'. Did you mean 'steps'?" in err
    assert "section 'meta_train'" in err
    _assert_light(imported)


def test_an_invalid_set_override_fails_before_heavy_imports(tmp_path: Path) -> None:
    rc, err, imported = _run(["evaluate", str(_demo_suite(tmp_path)), "--set", "max_episodes=0"], tmp_path)
    assert rc == 2 and "max_episodes: Input should be greater than or equal to 1" in err
    _assert_light(imported)


def _bad_manifest(tmp_path: Path) -> Path:
    text = (REPO_ROOT / "data_manifests" / "demo_quick.yaml").read_text()
    bad = tmp_path / "bad_manifest.yaml"
    bad.write_text(text.replace("spatial_dims: 2", "spatial_dims: 4", 1))
    assert "spatial_dims: 4" in bad.read_text()
    return bad


def test_a_manifest_error_fails_before_heavy_imports(tmp_path: Path) -> None:
    bad = _bad_manifest(tmp_path)
    rc, err, imported = _run(["ingest", str(bad)], tmp_path)
    assert rc == 2
    assert f"invalid configuration in {bad}" in err and "preprocess.spatial_dims" in err
    _assert_light(imported)


@pytest.mark.parametrize("command", ["episodes", "run"])
def test_a_suite_whose_manifest_is_invalid_fails_before_heavy_imports(command: str, tmp_path: Path) -> None:
    bad = _bad_manifest(tmp_path)
    rc, err, imported = _run([command, str(_demo_suite(tmp_path, manifest=str(bad)))], tmp_path)
    assert rc == 2 and f"invalid configuration in {bad}" in err and "preprocess.spatial_dims" in err
    _assert_light(imported)


def test_a_mistyped_command_gets_a_suggestion_without_heavy_imports(tmp_path: Path) -> None:
    rc, err, imported = _run(["evalute", "demo"], tmp_path)
    assert rc == 2
    assert "invalid choice: 'evalute'; did you mean 'evaluate'?" in err
    _assert_light(imported)


def test_missing_adapt_and_predict_inputs_fail_before_heavy_imports(tmp_path: Path) -> None:
    rc, err, imported = _run(["adapt", "--model", "m@current", "--support", "sets/none"], tmp_path)
    assert rc == 2 and "error: --support: sets/none not found" in err
    _assert_light(imported)
    rc, err, imported = _run(["predict", "--model", "m@current", "--input", "scans/none"], tmp_path)
    assert rc == 2 and "error: --input scans/none not found" in err
    _assert_light(imported)
