"""A suite that `python -m pipeline.cli meta-train SUITE` can run on the tiny world of tests/metatrain: a
suite file and a data manifest in the working directory, and finished ingest and episodes runs holding the
world in the local SQLite store (./mlflow/mlflow.db), tagged with the suite and the manifest's dataset so
the command finds them as it would after `fewscan ingest` and `fewscan episodes`.

The manifest is never ingested (the ingest run is made from the world directly); it only has to validate,
since the command reads the dataset name from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import distributed

from .test_resume_settings import _upstream_runs
from .world import build_world

SUITE = "tiny"  # the experiment fewscan/tiny; test_resume_settings' upstream runs carry this suite tag
DATASET = "d"  # the manifest's name; the same runs carry this dataset tag


def write_suite(root: Path, meta_train: dict[str, Any]) -> Path:
    """Build the world, its ingest and episodes runs in the store of the current directory (root), and
    root/tiny.yaml with this `meta_train` section. Returns the suite file."""
    _upstream_runs(build_world(root / "world"))
    (root / "scans").mkdir()
    (root / "tiny_manifest.yaml").write_text(
        f"name: {DATASET}\n"
        "scans: {root: scans, formats: [dicom]}\n"
        "labels: {source: csv, path: scans/labels.csv, key_column: Image Index, "
        "label_column: Finding Labels}\n"
    )
    suite = root / f"{SUITE}.yaml"
    # JSON is YAML: the section is written exactly as given
    suite.write_text(f"name: {SUITE}\ndataset: tiny_manifest.yaml\nmeta_train: {json.dumps(meta_train)}\n")
    return suite


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`pipeline.cli.main` in this process, as `fewscan` runs it: a fresh distributed context (the CLI
    makes the process-wide one) and this process's torch thread count restored afterwards."""
    monkeypatch.setattr(distributed, "_current", None)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
