"""DICOM as it comes (issue 14): which objects are images (by SOP Class UID), DICOMDIR, broken symbolic
links, degenerate images, Presentation LUT Shape INVERSE, files without a file-meta header, and pydicom's
warnings kept out of the terminal. One small generated example per case; identifiers are fake."""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_presentation_lut, apply_voi_lut
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MediaStorageDirectoryStorage,
    RawDataStorage,
    RTDoseStorage,
    RTPlanStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    TwelveLeadECGWaveformStorage,
    generate_uid,
)

from pipeline.ingest import reasons as R
from pipeline.ingest.build import build_store
from pipeline.ingest.dicom_read import check_image_object, read_dataset
from pipeline.ingest.manifest import IngestConfig
from pipeline.ingest.reasons import Rejected
from pipeline.ingest.worker import decode_file
from tests.ingest.conftest import make_dicom

RAMP = np.tile(np.arange(12, dtype=np.uint16) * 100, (10, 1))  # 10x12, values 0..1100


def _decode(p: Path, prep: dict[str, Any]) -> list[np.ndarray]:
    return [a.astype(np.float32) for a, _ in decode_file(p, "dicom", p.read_bytes(), prep)]


def _cfg(root: Path, **pre: Any) -> IngestConfig:
    return IngestConfig.model_validate(
        {"name": "t", "scans": {"root": str(root)}, "labels": {"source": "none"},
         "preprocess": {"image_size": [8, 8], **pre}, "workers": 1}
    )  # fmt: skip


def _report(out: Path) -> dict[str, Any]:
    rep = json.loads((out / "ingest_report.json").read_text())
    paths = json.loads(Path(".fewscan/reports/t.paths.json").read_text())["files"]
    rep["by_path"] = {paths[f["file_key"]]["path"]: f for f in rep["files"]}
    return rep


@pytest.mark.parametrize(
    "sop_class",
    [SegmentationStorage, RTDoseStorage, RTStructureSetStorage, RTPlanStorage, ComprehensiveSRStorage,
     GrayscaleSoftcopyPresentationStateStorage, KeyObjectSelectionDocumentStorage, RawDataStorage,
     TwelveLeadECGWaveformStorage],
)  # fmt: skip
def test_non_image_objects_are_rejected_by_sop_class_even_with_pixel_data(
    tmp_path: Path, prep2d: dict, sop_class: str
) -> None:
    p = make_dicom(tmp_path / "obj", RAMP, sop_class=sop_class)  # pixel data present on purpose
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", p.read_bytes(), prep2d)
    assert e.value.reason == R.NOT_IMAGE_OBJECT
    assert f"SOP Class UID {sop_class} ({pydicom.uid.UID(sop_class).name})" in e.value.detail
    # the 3D path judges the header alone (pixels are not read yet): same answer
    with pytest.raises(Rejected) as e:
        check_image_object(read_dataset(p.read_bytes(), header_only=True), header_only=True)
    assert e.value.reason == R.NOT_IMAGE_OBJECT


def test_image_classes_and_unknown_classes_with_pixels_are_read(tmp_path: Path, prep2d: dict) -> None:
    for name, cls in (
        ("dx", DigitalXRayImageStorageForPresentation),
        ("private", "1.2.826.0.1.3680043.9.9.1"),
    ):
        p = make_dicom(tmp_path / name, RAMP, sop_class=cls)
        assert len(_decode(p, prep2d)) == 1


def test_dicomdir_has_its_own_reason(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    make_dicom(root / "IM1", RAMP)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.FileSetID = "FAKESET"
    ds.DirectoryRecordSequence = []
    ds.save_as(root / "DICOMDIR", enforce_file_format=True)
    s = build_store(_cfg(root), tmp_path / "o")
    assert s.n_images == 1 and s.reasons == {"dicomdir": 1}
    assert "DICOMDIR" in _report(tmp_path / "o")["by_path"]["DICOMDIR"]["detail"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_broken_symbolic_links_are_reported_and_linked_folders_read_once(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    make_dicom(root / "sub" / "IM1", RAMP)
    outside = tmp_path / "elsewhere"
    make_dicom(outside / "IM2", RAMP)
    os.symlink(root / "missing.dcm", root / "dangling")
    os.symlink(root / "self", root / "self")  # a link to itself
    os.symlink(root, root / "sub" / "up")  # a folder link back to an enclosing folder
    os.symlink(outside, root / "linked")  # a folder link elsewhere: followed
    os.symlink(outside, root / "linked_again")  # a second link to it: its files are read once
    s = build_store(_cfg(root), tmp_path / "o")
    rep = _report(tmp_path / "o")["by_path"]
    assert rep["dangling"]["reason"] == R.DANGLING_SYMLINK
    assert rep["self"]["reason"] == R.SYMLINK_LOOP and rep["sub/up"]["reason"] == R.SYMLINK_LOOP
    assert rep["linked/IM2"]["status"] == "accepted" and "linked_again/IM2" not in rep
    assert s.n_images == 2 and s.reasons == {"dangling_symlink": 1, "symlink_loop": 2}


def test_too_small_below_the_configured_minimum(tmp_path: Path, prep2d: dict) -> None:
    p = make_dicom(tmp_path / "tiny", RAMP[:2, :3])
    with pytest.raises(Rejected) as e:
        _decode(p, prep2d)  # default preprocess.min_size 8
    assert e.value.reason == R.TOO_SMALL and "2x3 pixels, below preprocess.min_size 8" in e.value.detail
    assert len(_decode(p, dict(prep2d, min_size=2))) == 1
    one = tmp_path / "png"
    one.mkdir()
    Image.fromarray(np.array([[7]], np.uint8)).save(one / "1x1.png")
    Image.fromarray(RAMP.astype(np.uint8)).save(one / "ok.png")
    s = build_store(_cfg(one), tmp_path / "o")
    assert s.n_images == 1 and s.reasons == {"too_small": 1}


def test_constant_after_the_voi_window_is_rejected_and_blank_frames_dropped(
    tmp_path: Path, prep2d: dict
) -> None:
    # CT values far below a soft-tissue window: every pixel clips to 0
    p = make_dicom(tmp_path / "ct", (RAMP - 3000).astype(np.int16), sop_class=CTImageStorage,
                   WindowCenter=40, WindowWidth=400)  # fmt: skip
    with pytest.raises(Rejected) as e:
        _decode(p, prep2d)
    assert e.value.reason == R.CONSTANT_IMAGE and "header_window" in e.value.detail
    # without a window (min-max) a flat image is constant too
    with pytest.raises(Rejected) as e:
        _decode(make_dicom(tmp_path / "flat", np.full((10, 12), 500, np.uint16)), prep2d)
    assert e.value.reason == R.CONSTANT_IMAGE
    # a multi-frame file: the blank frame is dropped and counted, the others kept
    root = tmp_path / "mf"
    make_dicom(root / "mf.dcm", np.stack([RAMP, np.zeros_like(RAMP), RAMP[::-1]]))
    s = build_store(_cfg(root), tmp_path / "o")
    assert s.n_images == 2 and sorted(s.index["frame"]) == [0, 2]
    f = next(iter(_report(tmp_path / "o")["by_path"].values()))
    assert f["status"] == "accepted" and f["dropped_images"] == {"constant_image": 1}


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_presentation_lut_shape_inverse_matches_pydicom(
    tmp_path: Path, prep2d: dict, photometric: str
) -> None:
    p = make_dicom(tmp_path / "dx", RAMP, photometric=photometric, sop_class=DigitalXRayImageStorageForPresentation,
                   RescaleSlope=1, RescaleIntercept=0, WindowCenter=550, WindowWidth=800,
                   PresentationLUTShape="INVERSE")  # fmt: skip
    (got,) = _decode(p, dict(prep2d, image_size=[10, 12]))
    ds = pydicom.dcmread(p)
    want = apply_presentation_lut(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds), ds).astype(float)
    want = (want - want.min()) / (want.max() - want.min())
    np.testing.assert_allclose(got[0], want, atol=2e-3)
    assert got[0, 0, 0] == 1.0 and got[0, 0, -1] == 0.0  # low values bright: inverted once, not twice


def test_file_without_file_meta_is_read_as_pydicom_force_reads_it(tmp_path: Path, prep2d: dict) -> None:
    ref = make_dicom(tmp_path / "ref", RAMP)
    ds = pydicom.dcmread(ref)
    del ds.file_meta  # ACR-NEMA style: no preamble, no group 0002, implicit VR little endian
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    bare = tmp_path / "scans" / "IM0001"
    bare.parent.mkdir()
    bare.write_bytes(buf.getvalue())
    assert bare.read_bytes()[:2] == b"\x08\x00"
    prep = dict(prep2d, image_size=[10, 12])
    with pytest.warns(UserWarning, match="fewscan-note: transfer_syntax_inferred"):  # a code, in the report
        np.testing.assert_array_equal(_decode(bare, prep)[0], _decode(ref, prep)[0])
    s = build_store(_cfg(bare.parent), tmp_path / "o")
    rep = _report(tmp_path / "o")
    assert s.n_images == 1 and rep["warnings"] == {"transfer_syntax_inferred": 1}
    assert rep["by_path"]["IM0001"]["warnings"] == {"transfer_syntax_inferred": 1}


def test_pydicom_warnings_become_report_codes_not_terminal_output(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "scans"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while we write the bad values, too
        make_dicom(root / "IM1", RAMP, sop_uid="1.2.826.0.1.3680043.9.FAKEUID", patient_id="FAKEPID" * 10)
    capfd.readouterr()
    s = build_store(_cfg(root), tmp_path / "o")
    out, err = capfd.readouterr()
    assert "FAKEUID" not in out + err and "FAKEPID" not in out + err and "Invalid value" not in err
    rep = _report(tmp_path / "o")
    assert s.n_images == 1 and rep["warnings"] == {"invalid_value_UI": 1, "value_too_long_LO": 1}
    assert "FAKE" not in (tmp_path / "o" / "ingest_report.json").read_text()
