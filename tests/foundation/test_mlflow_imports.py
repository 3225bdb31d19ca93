"""Only the tracking layer imports mlflow (docs/ARCHITECTURE.md, principle 2).

Stages log through the `StageRun` they are handed and read upstream runs through `UpstreamRun`; everything
that talks to MLflow lives in `pipeline/tracking/`, so that a change of MLflow's API is one package's
change. The scan reads every module of `pipeline/` with `ast` (nothing is imported) and counts every form:
`import mlflow...`, `from mlflow... import ...` at module level or inside a function, and
`importlib.import_module("mlflow...")`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"
TRACKING = "pipeline/tracking/"

# Modules outside the tracking layer that must import mlflow, each with the reason; relative to the repo.
EXCEPTIONS: dict[str, str] = {
    "pipeline/serving.py": (
        "the adapted model's pyfunc class: MLflow loads and calls it as a subclass of "
        "mlflow.pyfunc.PythonModel, and its signature is built from mlflow.types (docs/CONTRACTS.md, "
        "'Adapted model')"
    ),
    "pipeline/adapt/fewscan_model.py": (
        "the adapted model's code file (a model from code): MLflow executes it and it must call "
        "mlflow.models.set_model; fewscan never imports it"
    ),
}


def mlflow_imports(source: str) -> list[int]:
    """Line numbers of every import of mlflow (or a submodule) in `source`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif (
            isinstance(node, ast.Call)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", ""))
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
            lines.append(node.lineno)
    return lines


def importers() -> dict[str, list[int]]:
    """{module path relative to the repo: lines importing mlflow} for every module of pipeline/ that does."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found = mlflow_imports(path.read_text(encoding="utf-8"))
        if found:
            out[path.relative_to(ROOT).as_posix()] = found
    return out


def test_the_scan_sees_every_import_form() -> None:
    src = (
        "import os\n"
        "import mlflow\n"
        "from mlflow.entities import RunTag\n"
        "def f():\n    import mlflow.pyfunc\n"
        "def g():\n    return importlib.import_module('mlflow.artifacts')\n"
        "from . import mlflow_helpers\n"  # a relative import of a module of ours: not mlflow
        "import mlflowish\n"
        "from pipeline import tracking\n"
    )
    assert mlflow_imports(src) == [2, 3, 5, 7]


def test_only_the_tracking_package_imports_mlflow() -> None:
    found = importers()
    assert any(p.startswith(TRACKING) for p in found)  # the scan really read the package
    outside = {p: lines for p, lines in found.items() if not p.startswith(TRACKING) and p not in EXCEPTIONS}
    assert not outside, (
        f"modules outside {TRACKING} import mlflow: {outside} (path: line numbers). Call the tracking layer "
        "(pipeline.tracking) instead, or add what it lacks there (docs/ARCHITECTURE.md, principle 2)"
    )


def test_every_exception_still_needs_mlflow() -> None:
    found = importers()
    stale = [p for p in EXCEPTIONS if p not in found]
    assert not stale, f"{stale} no longer import mlflow: remove them from EXCEPTIONS"
