"""Label sources and joins: file name, relative path, SOP/Study UID, patient id, folders, TSV, multi-label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ConfigError, DataError
from pipeline.ingest.build import build_store
from pipeline.ingest.labels import split_labels
from pipeline.ingest.manifest import IngestConfig
from tests.ingest.conftest import make_dicom

RAMP8 = np.arange(64, dtype=np.uint8).reshape(8, 8)  # a non-constant 8x8 image (constant ones are rejected)


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
        p = make_dicom(root / f"pat{i // 2}" / f"img{i}.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) + i * 10, sop_uid=uid,
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
            Image.fromarray(RAMP8).save(p)
    Image.fromarray(RAMP8).save(tmp_path / "png" / "stray.png")
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


# ------------------------------------------------------------------ label layouts (issue 14, issue 18)


def _pngs(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(RAMP8 + 20 * i).save(root / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def _csv_cfg(tmp_path: Path, text: str, **labels: object) -> IngestConfig:
    (tmp_path / "l.csv").write_text(text, encoding="utf-8")
    base = {"path": str(tmp_path / "l.csv"), "key_column": "file"}
    if labels.get("format") != "one_hot":
        base["label_column"] = "y"
    return _cfg(tmp_path / "png", {**base, **labels})


def test_list_valued_labels_python_and_json(tmp_path: Path) -> None:
    _pngs(tmp_path / "png", 4)
    text = (
        "file,y\n"
        "im0.png,\"['pulmonary fibrosis', 'chronic changes']\"\n"  # PadChest: a Python list literal
        'im1.png,"[""normal""]"\n'  # JSON
        "im2.png,\"['normal', ' COPD signs']\"\n"  # normal + a finding: the finding wins; spaces stripped
        "im3.png,[]\n"  # an empty list: no label
    )
    s = build_store(_csv_cfg(tmp_path, text, format="list", normal_label="normal"), tmp_path / "o")
    assert s.label_counts == {"pulmonary fibrosis": 1, "chronic changes": 1, "normal": 1, "COPD signs": 1}
    assert s.reasons == {"no_label": 1}


def test_a_list_cell_that_does_not_parse_names_its_row_and_is_never_evaluated(tmp_path: Path) -> None:
    _pngs(tmp_path / "png", 3)
    marker = tmp_path / "pwned"
    text = (
        "file,y\n"
        "im0.png,\"['ok']\"\n"
        f"im1.png,\"__import__('pathlib').Path('{marker}').touch()\"\n"
        "im2.png,\"{'a': 1}\"\n"
    )
    with pytest.raises(DataError) as e:
        build_store(_csv_cfg(tmp_path, text, format="list"), tmp_path / "o")
    msg = str(e.value)
    assert "2 row(s)" in msg and "data row 2 (line 3)" in msg and "data row 3 (line 4)" in msg
    assert "not a JSON or Python list" in msg and "is a dict" in msg and "nothing was decoded" in msg
    assert not marker.exists()


CHEXPERT = (
    "file,No Finding,Cardiomegaly,Edema\n"
    "im0.png,,1.0,-1.0\n"  # cardiomegaly, edema uncertain
    "im1.png,1.0,0,0\n"  # normal
    "im2.png,,0.0,\n"  # nothing positive: normal
    "im3.png,0,-1.0,1\n"  # cardiomegaly uncertain, edema
)


@pytest.mark.parametrize(
    ("uncertain", "blank", "counts", "reasons"),
    [
        ("positive", "negative", {"Cardiomegaly": 2, "Edema": 2, "No Finding": 2}, {}),
        ("negative", "negative", {"Cardiomegaly": 1, "Edema": 1, "No Finding": 2}, {}),
        ("exclude", "negative", {"No Finding": 2}, {"label_excluded": 2}),
        ("positive", "exclude", {"Cardiomegaly": 1, "Edema": 1, "No Finding": 1}, {"label_excluded": 2}),
    ],
)  # fmt: skip
def test_one_hot_columns_follow_the_manifest_policy(
    tmp_path: Path, uncertain: str, blank: str, counts: dict, reasons: dict
) -> None:
    _pngs(tmp_path / "png", 4)
    cfg = _csv_cfg(tmp_path, CHEXPERT, format="one_hot", label_columns=["No Finding", "Cardiomegaly", "Edema"],
                   uncertain=uncertain, blank=blank)  # fmt: skip
    s = build_store(cfg, tmp_path / "o")
    assert s.label_counts == counts and s.reasons == reasons
    if reasons:
        rep = json.loads((tmp_path / "o" / "ingest_report.json").read_text())
        details = [f["detail"] for f in rep["files"] if f["status"] == "rejected"]
        assert all(
            f"labels.{'uncertain' if uncertain == 'exclude' else 'blank'}: exclude" in d for d in details
        )


def test_one_hot_needs_an_explicit_policy_and_checks_its_values(tmp_path: Path) -> None:
    from pydantic import ValidationError

    _pngs(tmp_path / "png", 2)
    with pytest.raises(ValidationError, match="needs labels.label_columns, labels.uncertain.*no default"):
        _csv_cfg(tmp_path, CHEXPERT, format="one_hot")
    bad = "file,Cardiomegaly\nim0.png,1\nim1.png,yes\n"
    cfg = _csv_cfg(tmp_path, bad, format="one_hot", label_columns=["Cardiomegaly"], uncertain="negative",
                   blank="negative")  # fmt: skip
    with pytest.raises(DataError, match=r"data row 2 \(line 3\): column 'Cardiomegaly' holds 'yes'"):
        build_store(cfg, tmp_path / "o")
    cfg = _csv_cfg(tmp_path, bad, format="one_hot", label_columns=["Cardiomegaly", "Edema"],
                   uncertain="negative", blank="negative")  # fmt: skip
    with pytest.raises(ConfigError, match=r"label_columns \['Edema'\] are not columns"):
        build_store(cfg, tmp_path / "o")


def test_unlabelled_ingest_keeps_every_scan(tmp_path: Path) -> None:
    _pngs(tmp_path / "png" / "sub", 3)
    s = build_store(_cfg(tmp_path / "png", {"source": "none"}), tmp_path / "o")
    assert s.n_images == 3 and not s.reasons and s.label_counts == {}
    assert set(s.index["labels"]) == {""} and s.meta["label_names"] == []


def test_a_label_holding_the_index_separator_is_an_error_not_two_conditions(tmp_path: Path) -> None:
    """Issue 18: with separator ';' the label 'Mass|Nodule' became two conditions downstream."""
    _pngs(tmp_path / "png", 2)
    text = "file,y\nim0.png,Mass|Nodule\nim1.png,Effusion;Mass\n"
    with pytest.raises(DataError) as e:
        build_store(_csv_cfg(tmp_path, text, separator=";"), tmp_path / "o")
    msg = str(e.value)
    assert "data row 1 (line 2)" in msg and "'Mass|Nodule' contains '|'" in msg
    assert "labels.separator ';'" in msg and "set labels.separator: '|'" in msg
    # the default separator reads the same cell as two findings, as intended
    s = build_store(_csv_cfg(tmp_path, "file,y\nim0.png,Mass|Nodule\nim1.png,Mass\n"), tmp_path / "o2")
    assert s.label_counts == {"Mass": 2, "Nodule": 1}


def test_folder_names_with_the_separator_fail_before_decoding(tmp_path: Path) -> None:
    _pngs(tmp_path / "png" / "Mass|Nodule", 1)
    with pytest.raises(DataError, match="condition folder.*'Mass|Nodule' contains '|'.*rename the folder"):
        build_store(_cfg(tmp_path / "png", {"source": "folders"}), tmp_path / "o")


def test_duplicate_rows_with_conflicting_patients_are_an_error(tmp_path: Path) -> None:
    """Issue 18: a repeated key with another patient id used to keep the first silently."""
    _pngs(tmp_path / "png", 2)
    text = (
        "file,y,pid\nim0.png,Mass,FAKEP1\nim1.png,Mass,FAKEP2\nim0.png,Nodule,FAKEP1\nim1.png,Nodule,FAKEP3\n"
    )
    with pytest.raises(DataError) as e:
        build_store(_csv_cfg(tmp_path, text, patient_column="pid"), tmp_path / "o")
    msg = str(e.value)
    assert "data row 4 (line 5): same 'file' as data row 2 but another 'pid'" in msg
    assert "FAKEP" not in msg and "im1" not in msg  # neither patient ids nor keys in the message
    ok = "file,y,pid\nim0.png,Mass,FAKEP1\nim0.png,Nodule,FAKEP1\nim1.png,Mass,\n"
    s = build_store(_csv_cfg(tmp_path, ok, patient_column="pid"), tmp_path / "o2")
    assert s.label_counts == {"Mass": 2, "Nodule": 1}  # same patient repeated: labels united
