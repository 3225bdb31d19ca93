"""One SOP instance, one file in the store (issue 14): the same SOP Instance UID stored as a single frame
and again as a multi-frame file, or twice as the same form, is kept once: the first file by relative path
(pipeline/ingest/duplicates.py); the other is reported as `duplicate_sop_instance` naming the kept file
by its hashed key. Identifiers are fake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from pipeline.ingest import reasons as R
from pipeline.ingest.build import build_store
from pipeline.ingest.manifest import IngestConfig
from tests.ingest.conftest import make_dicom


def _cfg(root: Path, **pre: Any) -> IngestConfig:
    return IngestConfig.model_validate(
        {"name": "t", "scans": {"root": str(root)}, "labels": {"source": "none"},
         "preprocess": {"image_size": [8, 8], **pre}, "workers": 1}
    )  # fmt: skip


def _img(seed: int, frames: int = 1) -> np.ndarray:
    px = np.random.default_rng(seed).integers(0, 4096, (frames, 16, 16), dtype=np.uint16)
    return px[0] if frames == 1 else px


def test_same_sop_instance_in_any_form_is_kept_once_and_the_other_names_the_kept_file(
    tmp_path: Path,
) -> None:
    root = tmp_path / "scans"
    x, y, z = generate_uid(), generate_uid(), generate_uid()
    make_dicom(root / "a" / "single.dcm", _img(1), sop_uid=x)  # kept: first by path
    make_dicom(root / "b" / "multi.dcm", _img(2, frames=3), sop_uid=x)  # the same instance, 3 frames
    make_dicom(root / "c" / "one.dcm", _img(3), sop_uid=y)  # kept
    make_dicom(root / "d" / "one_again.dcm", _img(3), sop_uid=y)  # a plain second copy
    make_dicom(root / "e" / "multi.dcm", _img(4, frames=4), sop_uid=z)  # kept: a multi-frame first
    make_dicom(root / "f" / "frame.dcm", _img(5), sop_uid=z)  # a single frame after it
    s = build_store(_cfg(root), tmp_path / "o")

    assert s.n_images == 1 + 1 + 4  # a, c and e's four frames; nothing of b, d, f
    assert s.reasons == {R.DUPLICATE_SOP: 3}
    text = (tmp_path / "o" / "ingest_report.json").read_text()
    rep = json.loads(text)
    paths = json.loads(Path(".fewscan/reports/t.paths.json").read_text())["files"]
    key = {paths[f["file_key"]]["path"]: f["file_key"] for f in rep["files"]}
    by_path = {paths[f["file_key"]]["path"]: f for f in rep["files"]}
    for dup, kept in [("b/multi.dcm", "a/single.dcm"), ("d/one_again.dcm", "c/one.dcm"),
                      ("f/frame.dcm", "e/multi.dcm")]:  # fmt: skip
        f = by_path[dup]
        assert f["status"] == "rejected" and f["reason"] == R.DUPLICATE_SOP
        assert f"same SOP Instance UID as file {key[kept]}, which is kept" in f["detail"], f["detail"]
        assert by_path[kept]["status"] == "accepted"
    assert by_path["e/multi.dcm"]["images"] == 4
    for uid in (x, y, z):  # the report names files by hashed keys only, never a UID or a path
        assert uid not in text
    assert "single.dcm" not in text
    assert s.index["scan_key"].is_unique


def test_a_copy_whose_first_file_stored_nothing_is_kept(tmp_path: Path) -> None:
    # the first copy is blank (constant_image): the instance is not in the store, so the second is used
    root = tmp_path / "scans"
    uid = generate_uid()
    make_dicom(root / "a.dcm", np.full((16, 16), 5, np.uint16), sop_uid=uid)
    make_dicom(root / "b.dcm", _img(6), sop_uid=uid)
    s = build_store(_cfg(root), tmp_path / "o")
    assert s.n_images == 1 and s.reasons == {R.CONSTANT_IMAGE: 1}


def test_3d_duplicate_slice_names_the_slice_kept(tmp_path: Path) -> None:
    from tests.ingest.test_series import _series

    folder = tmp_path / "scans" / "SER"
    slices = sorted(_series(folder, [0.0, 1.0, 2.0], np.random.default_rng(0)))
    (folder / "zz_copy").write_bytes(slices[0].read_bytes())  # after every slice by path
    s = build_store(_cfg(tmp_path / "scans", spatial_dims=3, image_size=[4, 8, 8]), tmp_path / "o")
    assert s.n_images == 1 and s.reasons == {R.DUPLICATE_SOP: 1}
    rep = json.loads((tmp_path / "o" / "ingest_report.json").read_text())
    paths = json.loads(Path(".fewscan/reports/t.paths.json").read_text())["files"]
    by_path = {paths[f["file_key"]]["path"]: f for f in rep["files"]}
    kept = next(f for p, f in by_path.items() if p == f"SER/{slices[0].name}")
    assert by_path["SER/zz_copy"]["detail"] == (
        f"same SOP Instance UID as slice {kept['file_key']} of this series, which is kept"
    )
