"""labels.group_columns (docs/ingest.md): label-table columns copied verbatim into the scan index, for
episodes.group_by; never one of the columns ingest hashes, bins or parses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.ingest.build import build_store
from pipeline.ingest.manifest import IngestConfig


def _study(root: Path) -> None:
    (root / "png").mkdir(parents=True)
    lines = ["file,label,alphabet,drawing"]
    for i in range(6):
        img = (np.arange(64).reshape(8, 8) * 3 + i).astype(np.uint8)
        Image.fromarray(img).save(root / "png" / f"d{i}.png")
        lines.append(f"d{i}.png,{'ab'[i % 2]},{'Greek' if i < 3 else 'Latin'},d{i}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def _cfg(root: Path, **labels) -> IngestConfig:
    return IngestConfig.model_validate(
        {
            "name": "g",
            "scans": {"root": str(root / "png")},
            "labels": {"path": str(root / "labels.csv"), "key_column": "file", "label_column": "label",
                       "patient_column": "drawing", "normal_label": "none", **labels},
            "preprocess": {"image_size": [8, 8]},
            "salt_file": str(root / "salt"),
            "cache_dir": None,
            "local_report_dir": str(root / "reports"),
            "workers": 1,
        }
    )  # fmt: skip


def test_group_column_reaches_the_scan_index_verbatim(tmp_path: Path) -> None:
    _study(tmp_path)
    s = build_store(_cfg(tmp_path, group_columns=["alphabet"]), tmp_path / "out")
    assert s.n_images == 6
    assert sorted(s.index["alphabet"]) == ["Greek"] * 3 + ["Latin"] * 3
    # the patient column is still only a salted key
    assert not set(s.index["patient_key"]) & {f"d{i}" for i in range(6)}
    plain = build_store(_cfg(tmp_path), tmp_path / "out2")
    assert "alphabet" not in plain.index.columns


def test_group_columns_are_checked(tmp_path: Path) -> None:
    _study(tmp_path)
    with pytest.raises(ValueError, match=r"'drawing' \(labels.patient_column\)"):
        _cfg(tmp_path, group_columns=["drawing"])
    with pytest.raises(ValueError, match="needs labels.source=csv"):
        IngestConfig.model_validate(
            {"name": "g", "scans": {"root": "x"}, "labels": {"source": "folders", "group_columns": ["a"]}}
        )
    with pytest.raises(ConfigError, match="labels.group_columns 'script' is not a column of labels.csv"):
        build_store(_cfg(tmp_path, group_columns=["script"]), tmp_path / "out")
    (tmp_path / "labels.csv").write_text(
        (tmp_path / "labels.csv").read_text().replace("alphabet", "modality")
    )
    with pytest.raises(ConfigError, match=r"\['modality'\] would replace column\(s\) of the scan index"):
        build_store(_cfg(tmp_path, group_columns=["modality"]), tmp_path / "out")
