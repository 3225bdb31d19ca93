"""What ingest logs about its manifest: no path in clear, and operational knobs outside the fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.ingest import stage
from pipeline.ingest.manifest import IngestConfig


def _cfg(tmp_path: Path, root: str, workers: int = 0) -> IngestConfig:
    return IngestConfig.model_validate(
        {
            "name": "t",
            "scans": {"root": str(tmp_path / root)},
            "labels": {
                "source": "csv",
                "path": str(tmp_path / root / "labels.csv"),
                "key_column": "Image Index",
                "label_column": "Finding Labels",
            },
            "salt_file": str(tmp_path / "salt"),
            "workers": workers,
        }
    )


def test_public_config_hashes_every_path(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "DOE_JANE_export")
    text = json.dumps(stage.public_config(cfg))
    assert "DOE_JANE" not in text and str(tmp_path) not in text
    pub = stage.public_config(cfg)
    assert pub["scans"]["root"].startswith("path:") and pub["labels"]["path"].startswith("path:")
    # stable for the same folder (the salt is reused), different for another one
    assert stage.public_config(cfg)["scans"]["root"] == pub["scans"]["root"]
    assert stage.public_config(_cfg(tmp_path, "other"))["scans"]["root"] != pub["scans"]["root"]


def test_workers_do_not_change_the_fingerprint(tmp_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import stages, tracking

    seen: list[str] = []
    monkeypatch.setattr(tracking, "find_reusable", lambda s, fp, **scope: seen.append(fp) or "r" * 32)
    for w in (1, 2):
        stages.execute_stage(
            "ingest", _cfg(tmp_store, "x", workers=w), upstream={}, suite=None, dataset="t", reuse=True
        )
    assert len(seen) == 2 and seen[0] == seen[1]
