"""Label sources and joins: file name, relative path, SOP/Study UID, patient id, folders, TSV, multi-label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.ingest.build import build_store
from pipeline.ingest.labels import split_labels
from pipeline.ingest.manifest import IngestConfig
from tests.ingest.conftest import make_dicom


def _cfg(root: Path, labels: dict, **kw) -> IngestConfig:
    return IngestConfig.model_validate(
        {
            "name": "t",
            "scans": {"root": str(root)},
            "labels": labels,
            "preprocess": {"image_size": [8, 8]},
            "workers": 1,
            **kw,
        }
    )


def _dicoms(root: Path) -> list[dict]:
    out = []
    for i in range(4):
        uid, study = f"1.2.3.4.{i}", f"1.2.3.9.{i // 2}"
        p = make_dicom(root / f"pat{i // 2}" / f"img{i}.dcm", np.full((8, 8), i * 10, np.uint16), sop_uid=uid,
                       study_uid=study, patient_id=f"FAKEP{i // 2}")  # fmt: skip
        out.append(
            {"path": p, "sop": uid, "study": study, "pid": f"FAKEP{i // 2}", "rel": f"pat{i // 2}/img{i}.dcm"}
        )
    return out


@pytest.mark.parametrize(
    ("join", "field", "expect_images"),
    [("file_name", None, 4), ("relative_path", "rel", 4), ("sop_instance_uid", "sop", 4),
     ("study_instance_uid", "study", 4), ("patient_id", "pid", 4)],
)  # fmt: skip
def test_every_join_key(tmp_path: Path, join: str, field: str | None, expect_images: int) -> None:
    info = _dicoms(tmp_path / "scans")
    lines = ["key\tfindings"]
    seen = set()
    for i, d in enumerate(info):
        key = d["path"].name if field is None else d[field]
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"{key}\t{'Mass|Nodule' if i % 2 else 'No Finding'}")
    (tmp_path / "labels.tsv").write_text("\n".join(lines) + "\n")
    cfg = _cfg(
        tmp_path / "scans",
        {"path": str(tmp_path / "labels.tsv"), "join": join, "key_column": "key", "label_column": "findings"},
    )
    s = build_store(cfg, tmp_path / "out")
    assert s.n_images == expect_images and not s.reasons
    if join in ("study_instance_uid", "patient_id"):  # one row labels both images of a study/patient
        assert s.label_counts == {"No Finding": 4}
    else:
        assert s.label_counts == {"Mass": 2, "Nodule": 2, "No Finding": 2}
    if join == "patient_id":
        assert s.n_patients == 2


def test_file_name_join_tolerates_missing_extension(tmp_path: Path) -> None:
    _dicoms(tmp_path / "scans")
    (tmp_path / "l.csv").write_text("name,y\nimg0,A\nimg1,B\nimg2.dcm,A\nimg3,B\n")
    cfg = _cfg(
        tmp_path / "scans", {"path": str(tmp_path / "l.csv"), "key_column": "name", "label_column": "y"}
    )
    assert build_store(cfg, tmp_path / "o").label_counts == {"A": 2, "B": 2}


def test_no_label_and_label_for_missing_file(tmp_path: Path) -> None:
    _dicoms(tmp_path / "scans")
    (tmp_path / "l.csv").write_text("name,y\nimg0.dcm,A\nimg1.dcm,\nghost.dcm,B\n")
    cfg = _cfg(
        tmp_path / "scans", {"path": str(tmp_path / "l.csv"), "key_column": "name", "label_column": "y"}
    )
    s = build_store(cfg, tmp_path / "o")
    assert s.n_images == 1 and s.reasons == {"no_label": 3, "label_for_missing_file": 1}


def test_folder_per_condition(tmp_path: Path) -> None:
    for cls, n in (("Pneumonia", 2), ("Normal", 3)):
        for i in range(n):
            p = tmp_path / "png" / cls / f"sub{i}" / f"x{i}.png"
            p.parent.mkdir(parents=True)
            Image.fromarray(np.full((8, 8), 100, np.uint8)).save(p)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "png" / "stray.png")
    cfg = _cfg(tmp_path / "png", {"source": "folders", "normal_label": "Normal"})
    s = build_store(cfg, tmp_path / "o")
    assert s.label_counts == {"Normal": 3, "Pneumonia": 2} and s.reasons == {"no_label": 1}
    assert s.meta["normal_label"] == "Normal"


def test_medmnist_labels_come_from_the_manifest_names(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d" / "breastmnist.npz", train_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [1], [0], [1]]))  # fmt: skip
    cfg = _cfg(tmp_path / "d", {"source": "npz", "names": ["normal", "malignant"], "normal_label": "normal"},
               preprocess={"image_size": [28, 28]})  # fmt: skip
    s = build_store(cfg, tmp_path / "o")
    assert s.label_counts == {"normal": 2, "malignant": 3}
    assert s.index["scan_key"].nunique() == 5 and set(s.index["npz_split"]) == {"train"}


def test_split_labels_rules() -> None:
    assert split_labels(" Mass|Effusion |Mass", "|", "No Finding") == ["Effusion", "Mass"]
    assert split_labels("No Finding|Mass", "|", "No Finding") == ["Mass"]
    assert split_labels("", "|", "No Finding") == []


def test_unknown_label_column_names_the_choices(tmp_path: Path) -> None:
    _dicoms(tmp_path / "scans")
    (tmp_path / "l.csv").write_text("name,y\nimg0.dcm,A\n")
    cfg = _cfg(
        tmp_path / "scans", {"path": str(tmp_path / "l.csv"), "key_column": "name", "label_column": "Finding"}
    )
    with pytest.raises(ConfigError, match="label_column 'Finding'.*columns: name, y"):
        build_store(cfg, tmp_path / "o")
