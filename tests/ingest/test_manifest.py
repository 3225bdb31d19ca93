"""The data manifest is validated up front: unknown keys and impossible values name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.ingest.manifest import IngestConfig, load_manifest

REPO = Path(__file__).resolve().parents[2]
BASE = {
    "name": "x",
    "scans": {"root": "r"},
    "labels": {"path": "l.csv", "key_column": "k", "label_column": "y"},
}


def test_unknown_key_fails_with_valid_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'preprocess.image_sise'.*Did you mean 'image_size'"):
        validate({**BASE, "preprocess": {"image_sise": [8, 8]}}, IngestConfig, "m.yaml")
    with pytest.raises(ConfigError, match="unknown key 'scan'"):
        validate({**BASE, "scan": {}}, IngestConfig, "m.yaml")


@pytest.mark.parametrize(
    ("patch", "msg"),
    [
        ({"labels": {"path": "l.csv"}}, "needs labels.key_column"),
        ({"preprocess": {"image_size": [8, 8, 8]}}, "must be 2 sizes"),
        ({"preprocess": {"spacing": [1, 1, 1]}}, "spatial_dims=3 only"),
        ({"preprocess": {"voi": "manifest"}}, "needs preprocess.window"),
        ({"labels": {"source": "npz"}}, "needs labels.names"),
        ({"scans": {"root": "r", "formats": ["tiff"]}}, "scans.formats"),
        ({"labels": {**BASE["labels"], "join": "accession"}}, "labels.join"),
    ],
)
def test_impossible_values_are_named(patch: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        validate({**BASE, **patch}, IngestConfig, "m.yaml")


def test_repo_demo_manifests_load() -> None:
    demo = load_manifest(REPO / "data_manifests" / "demo.yaml")
    quick = load_manifest(REPO / "data_manifests" / "demo_quick.yaml")
    assert demo.scans.root == Path("demo_data/demo/dicom") and demo.preprocess.image_size == [64, 64]
    assert quick.scans.root == Path("demo_data/demo_quick/dicom") and quick.preprocess.image_size == [32, 32]
    assert quick.labels.path == Path("demo_data/demo_quick/labels.csv")
    assert demo.labels.key_column == "Image Index" and demo.preprocess.channels == 1
