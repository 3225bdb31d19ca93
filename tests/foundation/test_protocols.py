"""The run and stage-module protocols (pipeline/protocols.py) make drift a type error: mypy, run here on
small snippets as `.ci/run` runs it on the package, refuses a fake run that lacks a member or changes a
signature, a stage that calls a run method the protocol does not offer, and a stage module whose `execute`
wants the concrete MLflow run. Also: every test fake built on `NullRun` is in the project's mypy run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from pipeline.protocols import NullRun

ROOT = Path(__file__).resolve().parents[2]

# Only pipeline.protocols (and the stdlib) is analysed: the tracking and pydantic types it names for the
# checker are skipped, which keeps a cold run to seconds (a full `mypy` of the package reads torch and mlflow).
MYPY_INI = """\
[mypy]
ignore_missing_imports = True
follow_imports = silent
[mypy-pipeline.tracking,pipeline.tracking.*,pydantic,pydantic.*]
follow_imports = skip
"""

HEADER = """\
from __future__ import annotations
from pathlib import Path
from typing import Any
from pipeline.protocols import NullRun, RunLike, StageModule
"""


CONTROL = """
class Recording(NullRun):
    def __init__(self, outdir: Path) -> None:
        super().__init__(outdir, run_id="r0")
        self.params: dict[str, Any] = {}

    def log_params(self, d: dict[str, Any]) -> None:
        self.params.update(d)

    def register_model(self, artifact_path: str, name: str, alias: str = "current") -> str:
        return "1"

class Stage:
    CONFIG = object

    def run_name(self, cfg: Any) -> str:
        return "x"

    def execute(self, cfg: Any, run: RunLike, upstream: dict[str, Any]) -> Any:
        run.log_params({"a": 1})
        run.log_metrics({"m": 1.0}, step=2)
        return None

_run: type[RunLike] = Recording
_module: StageModule = Stage()
"""

# name: (snippet, the error mypy must report for it)
DRIFT = {
    "changed_signature": (  # a fake that drops a parameter a stage passes
        """
class Drifted(NullRun):
    def register_model(self, artifact_path: str, name: str) -> str:
        return ""
_run: type[RunLike] = Drifted
""",
        r'Signature of "register_model" incompatible with supertype "pipeline.protocols.NullRun"',
    ),
    "missing_members": (  # a hand-written fake (not built on NullRun) that lacks members
        """
class Partial:
    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
    def log_params(self, d: dict[str, Any]) -> None: ...
_run: type[RunLike] = Partial
""",
        r'expression has type "type\[Partial\]", variable has type "type\[RunLike\]"',
    ),
    "uncovered_call": (  # a stage calling what only the MLflow run has: a follower rank would fail there
        """
def execute(cfg: Any, run: RunLike, upstream: dict[str, Any]) -> None:
    run.log_metric("loss", 1.0)
""",
        r'"RunLike" has no attribute "log_metric"',
    ),
    "stage_wants_concrete_run": (  # a stage module whose execute wants a run class, not the protocol
        """
class Concrete(NullRun): ...
class Stage:
    CONFIG = object
    def run_name(self, cfg: Any) -> str:
        return "x"
    def execute(self, cfg: Any, run: Concrete, upstream: dict[str, Any]) -> Any:
        return None
_module: StageModule = Stage()
""",
        r'expression has type "Stage", variable has type "StageModule"',
    ),
}


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """mypy's errors for each snippet (control and drift cases, one file each, one mypy run)."""
    tmp = tmp_path_factory.mktemp("mypy")
    (tmp / "mypy.ini").write_text(MYPY_INI)
    files = {"control": CONTROL, **{name: body for name, (body, _) in DRIFT.items()}}
    for name, body in files.items():
        (tmp / f"{name}.py").write_text(HEADER + body)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", ".cache"]
        + [f"{name}.py" for name in files],
        cwd=tmp,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1) and "error:" in proc.stdout, proc.stdout + proc.stderr
    return {
        name: "\n".join(line for line in proc.stdout.splitlines() if line.startswith(f"{name}.py:"))
        for name in files
    }


def test_a_complete_fake_and_a_conforming_stage_pass(mypy_report: dict[str, str]) -> None:
    """The control: what the drift cases change, unchanged, type-checks."""
    assert mypy_report["control"] == ""


@pytest.mark.parametrize("case", sorted(DRIFT))
def test_drift_is_a_type_error(mypy_report: dict[str, str], case: str) -> None:
    _, error = DRIFT[case]
    assert re.search(error, mypy_report[case]), mypy_report[case] or f"mypy found no error in {case}"


def test_the_null_run_records_nothing_and_finds_nothing(tmp_path: Path) -> None:
    run = NullRun(tmp_path, run_id="x", suite="s")
    run.log_params({"a": 1})
    run.log_artifact(tmp_path)
    assert (run.run_id, run.suite, run.resumed, run.outdir) == ("x", "s", False, tmp_path)
    assert run.own_artifact("checkpoints/last.pt") is None
    assert run.register_model("models/x", "name") == ""
    assert list(tmp_path.iterdir()) == []


def test_every_fake_run_is_in_the_projects_mypy_run() -> None:
    """A test module that builds a fake on NullRun is listed in [tool.mypy] and asserts `_IS_A_RUN`."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    checked = set(config.get("modules", []))
    fakes = sorted(
        p.relative_to(ROOT)
        for p in (ROOT / "tests").rglob("*.py")
        if re.search(r"class \w+\(NullRun\)", p.read_text())
    )
    assert fakes, "no test fake built on NullRun found: the search is wrong"
    for rel in fakes:
        if rel.name == Path(__file__).name:
            continue  # this file's fakes are snippets, checked above
        module = ".".join(rel.with_suffix("").parts)
        assert module in checked, f"{rel} defines a fake run but [tool.mypy] modules does not check it"
        assert "_IS_A_RUN: type[RunLike] = " in (ROOT / rel).read_text(), rel
