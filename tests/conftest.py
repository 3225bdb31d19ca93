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
    monkeypatch.setattr(tracking, "_client", None)
    monkeypatch.setattr(tracking, "_client_uri", None)
    return tmp_path
