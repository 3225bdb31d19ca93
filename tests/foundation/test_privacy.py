"""Nothing leaves the machine by default: MLflow telemetry is off unless the user opts in (README)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = (
    "import os, pipeline.cli, pipeline.tracking\n"
    "from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY\n"
    "print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'), MLFLOW_DISABLE_TELEMETRY.get())\n"
)


def _probe(tmp_path: Path, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env={**base, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_telemetry_off_by_default_before_mlflow_is_imported(tmp_path: Path) -> None:
    assert _probe(tmp_path) == "true True"


def test_telemetry_explicit_opt_in_is_respected(tmp_path: Path) -> None:
    assert _probe(tmp_path, MLFLOW_DISABLE_TELEMETRY="false") == "false False"


def test_ui_server_inherits_telemetry_off(tmp_path: Path, monkeypatch) -> None:
    from pipeline import cli

    seen: dict[str, str | None] = {}

    def fake_serve(cmd: list[str]) -> int:
        # serve_until_stopped starts the server with this process's environment (Popen without env=)
        seen["v"] = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
        return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(cli, "serve_until_stopped", fake_serve)
    assert cli.main(["ui"]) == 0
    assert seen["v"] == "true"


def test_local_path_reports_are_owner_only(tmp_path: Path) -> None:
    from pipeline.adapt.ledger import PathLedger
    from pipeline.adapt.reports import write_json_atomic
    from pipeline.ingest.store import atomic_write_json

    old = os.umask(0o022)
    try:
        ledger = PathLedger(b"s" * 32, tmp_path / "reports" / "adapt.paths.json")
        ledger.cite(tmp_path / "Doe_John" / "scan.dcm", "unreadable")
        write_json_atomic(tmp_path / "reports" / "adapt-run.json", {"a": 1}, private=True)
        atomic_write_json(tmp_path / "reports" / "demo.paths.json", {"a": 1}, private=True)
        write_json_atomic(tmp_path / "public.json", {"a": 1})  # artifacts keep the usual mode
    finally:
        os.umask(old)
    for name in ("adapt.paths.json", "adapt-run.json", "demo.paths.json"):
        assert (tmp_path / "reports" / name).stat().st_mode & 0o777 == 0o600, name
    assert (tmp_path / "reports").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "public.json").stat().st_mode & 0o777 == 0o644
