"""Shared fixtures: every test that touches MLflow gets its own store in a temporary working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture
def tmp_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """chdir into a fresh folder whose ./mlflow/mlflow.db is the default tracking store."""
    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking.store, "_client", None)
    monkeypatch.setattr(tracking.store, "_client_uri", None)
    return tmp_path


@pytest.fixture(autouse=True, scope="session")
def _owner_key_outside_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """fewscan's owner key (used against a tracking server) in a temporary folder, never in ~/.config;
    subprocesses inherit it."""
    os.environ.setdefault("FEWSCAN_OWNER_KEY_FILE", str(tmp_path_factory.mktemp("owner-key") / "owner.key"))
