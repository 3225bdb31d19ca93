"""The DICOM pixel pipeline: modality LUT, VOI LUT / window, MONOCHROME1, RLE, multi-frame, rejections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import BasicTextSRStorage, CTImageStorage, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless

from pipeline.ingest import reasons as R
from pipeline.ingest.reasons import Rejected
from pipeline.ingest.worker import decode_file
from tests.ingest.conftest import make_dicom


def _decode(p: Path, prep: dict[str, Any]) -> list[np.ndarray]:
    return [a.astype(np.float32) for a, _ in decode_file(p, "dicom", p.read_bytes(), prep)]


def _same_size(prep: dict[str, Any], h: int, w: int) -> dict[str, Any]:
    return dict(prep, image_size=[h, w])  # no resize: values can be checked pixel by pixel


def test_rescale_then_header_window_matches_ps33_formula(
    tmp_path: Path, ramp: np.ndarray, prep2d: dict
) -> None:
    p = make_dicom(
        tmp_path / "a.dcm", ramp, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=500, WindowWidth=1000
    )
    (got,) = _decode(p, _same_size(prep2d, 40, 60))
    hu = ramp.astype(np.float64) * 2 - 100
    want = np.clip((hu - 499.5) / 999 + 0.5, 0, 1)
    np.testing.assert_allclose(got[0], want, atol=1e-3)  # float16 store
    assert got[0, 0, 0] == 0 and got[0, 0, -1] == 1  # clipped at both ends: the window was applied


def test_manifest_window_overrides_header(tmp_path: Path, ramp: np.ndarray, prep2d: dict) -> None:
    p = make_dicom(tmp_path / "a.dcm", ramp, WindowCenter=500, WindowWidth=1000)
    prep = dict(_same_size(prep2d, 40, 60), voi="manifest", window={"center": 200.0, "width": 100.0})
    (got,) = _decode(p, prep)
    want = np.clip((ramp - 199.5) / 99 + 0.5, 0, 1)
    np.testing.assert_allclose(got[0], want, atol=1e-3)


def test_no_window_falls_back_to_minmax(tmp_path: Path, ramp: np.ndarray, prep2d: dict) -> None:
    p = make_dicom(tmp_path / "a.dcm", ramp + 100)
    (got,) = _decode(p, _same_size(prep2d, 40, 60))
    np.testing.assert_allclose(got[0], (ramp - ramp.min()) / (ramp.max() - ramp.min()), atol=1e-3)


def test_monochrome1_is_inverted(tmp_path: Path, ramp: np.ndarray, prep2d: dict) -> None:
    prep = _same_size(prep2d, 40, 60)
    (m2,) = _decode(make_dicom(tmp_path / "m2", ramp, WindowCenter=600, WindowWidth=800), prep)
    (m1,) = _decode(
        make_dicom(tmp_path / "m1", ramp, photometric="MONOCHROME1", WindowCenter=600, WindowWidth=800), prep
    )
    np.testing.assert_allclose(m1 + m2, 1.0, atol=1e-3)
    assert m1[0, 0, 0] == 1.0  # low stored value = bright in MONOCHROME1


def test_voi_lut_sequence_is_applied(tmp_path: Path, prep2d: dict) -> None:
    px = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [8, 0, 8]  # 8 entries, first mapped value 0, 8 bits out
    values = [0, 10, 20, 40, 80, 160, 200, 255]
    lut.add_new(0x00283006, "OW", np.array(values, "<u2").tobytes())
    p = make_dicom(tmp_path / "lut", px, VOILUTSequence=[lut], WindowCenter=3, WindowWidth=2)
    (got,) = _decode(p, dict(_same_size(prep2d, 2, 4), min_size=1))  # a 2x4 test image
    np.testing.assert_allclose(got[0], np.array(values).reshape(2, 4) / 255.0, atol=1e-3)


def test_rle_decodes_to_the_same_pixels(tmp_path: Path, ramp: np.ndarray, prep2d: dict) -> None:
    rng = np.random.default_rng(0)
    px = rng.integers(0, 4096, (40, 60), dtype=np.uint16)
    raw = make_dicom(tmp_path / "raw", px)
    rle = make_dicom(tmp_path / "rle", px, compress_rle=True)
    assert raw.read_bytes() != rle.read_bytes()
    prep = _same_size(prep2d, 40, 60)
    np.testing.assert_array_equal(_decode(raw, prep)[0], _decode(rle, prep)[0])


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless])
def test_lossless_jpeg_family_decodes_to_the_same_pixels(tmp_path: Path, prep2d: dict, syntax: str) -> None:
    px = np.random.default_rng(1).integers(0, 4096, (40, 60), dtype=np.uint16)
    ref = make_dicom(tmp_path / "raw", px, BitsStored=12)
    comp = make_dicom(tmp_path / "comp", px, compress=syntax, BitsStored=12)
    assert pydicom_ts(comp) == syntax
    prep = _same_size(prep2d, 40, 60)
    np.testing.assert_array_equal(_decode(ref, prep)[0], _decode(comp, prep)[0])


def pydicom_ts(p: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_multiframe_split_first_and_volume(tmp_path: Path, prep2d: dict) -> None:
    frames = np.stack([np.full((8, 8), v, np.uint16) for v in (0, 100, 200)])
    frames[:, 0, 0] = 300  # every frame shares the range so min-max spans the file
    p = make_dicom(tmp_path / "mf", frames)
    prep = _same_size(prep2d, 8, 8)
    items = decode_file(p, "dicom", p.read_bytes(), prep)
    assert [f["frame"] for _, f in items] == [0, 1, 2]
    assert [round(float(a[0, 4, 4]), 2) for a, _ in items] == [0.0, 0.33, 0.67]
    first = decode_file(p, "dicom", p.read_bytes(), dict(prep, multiframe="first"))
    assert len(first) == 1 and first[0][1]["frame"] == -1
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", p.read_bytes(), dict(prep, multiframe="volume"))
    assert e.value.reason == R.WRONG_DIMENSIONALITY


def test_aspect_preserving_resize_pads_not_stretches(tmp_path: Path, prep2d: dict) -> None:
    px = np.full((20, 40), 1000, np.uint16)
    px[0, 0] = 0
    (got,) = _decode(make_dicom(tmp_path / "wide", px), prep2d)  # 20x40 -> 16x32 inside 32x32
    rows_with_image = np.flatnonzero(got[0].max(axis=1) > 0.5)
    assert rows_with_image.min() == 8 and rows_with_image.max() == 23
    assert got[0, :8].max() == 0 and got[0, 24:].max() == 0


def _encapsulated(tmp_path: Path, syntax: str) -> Path:
    p = make_dicom(tmp_path / "enc", np.zeros((8, 8), np.uint16))
    import pydicom

    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 20])
    ds["PixelData"].VR = "OB"
    ds.save_as(p)
    return p


def test_undecodable_transfer_syntax_names_syntax_and_package(
    tmp_path: Path, prep2d: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from pipeline.ingest import dicom_read

    # Whether a JPEG Lossless plugin is installed varies by machine (python-gdcm decodes it): simulate
    # a machine without one, with pydicom's own description of what is missing.
    real = get_decoder(JPEGLosslessSV1)
    fake = SimpleNamespace(
        is_available=False,
        missing_dependencies=list(real.missing_dependencies)
        or [
            "gdcm - requires python-gdcm>=3.0.10",
            "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1",
        ],
    )
    monkeypatch.setattr(dicom_read, "get_decoder", lambda ts: fake)
    p = _encapsulated(tmp_path, JPEGLosslessSV1)
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", p.read_bytes(), prep2d)
    assert e.value.reason == R.UNDECODABLE
    assert "JPEG Lossless" in e.value.detail and "pylibjpeg" in e.value.detail


def test_transfer_syntax_without_any_decoder_is_rejected_by_name(tmp_path: Path, prep2d: dict) -> None:
    from pydicom.uid import MPEG2MPML

    p = _encapsulated(tmp_path, MPEG2MPML)
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", p.read_bytes(), prep2d)
    assert e.value.reason == R.UNDECODABLE
    assert "MPEG2" in e.value.detail and "no pixel data decoder" in e.value.detail


def test_sr_is_not_an_image_object(tmp_path: Path, prep2d: dict) -> None:
    p = make_dicom(tmp_path / "sr", np.zeros((4, 4), np.uint16), sop_class=BasicTextSRStorage)
    import pydicom

    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", p.read_bytes(), prep2d)
    assert e.value.reason == R.NOT_IMAGE_OBJECT and "SR" in e.value.detail


def test_image_object_without_pixels(tmp_path: Path, prep2d: dict) -> None:
    p = make_dicom(tmp_path / "ct", np.zeros((4, 4), np.uint16), sop_class=CTImageStorage)
    import pydicom

    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", p.read_bytes(), prep2d)
    assert e.value.reason == R.NO_PIXEL_DATA


def test_truncated_file_is_unreadable(tmp_path: Path, ramp: np.ndarray, prep2d: dict) -> None:
    p = make_dicom(tmp_path / "t", ramp)
    data = p.read_bytes()[:-1000]
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", data, prep2d)
    assert e.value.reason == R.UNREADABLE
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", b"\x08\x00\x05\x00garbage", prep2d)
    assert e.value.reason == R.UNREADABLE


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_native_fast_path_matches_pydicom_including_unused_high_bits(tmp_path: Path, dtype: type) -> None:
    import pydicom

    from pipeline.ingest.dicom_read import _native_grey

    rng = np.random.default_rng(2)
    px = rng.integers(0, 1 << 16, (3, 8, 8), dtype=np.uint16).view(dtype)  # high bits hold garbage
    p = make_dicom(tmp_path / "n", px, BitsStored=12)
    ds = pydicom.dcmread(p)
    fast = _native_grey(ds)
    assert fast is not None
    np.testing.assert_array_equal(fast, ds.pixel_array)  # pydicom masks/sign-extends the same way
    assert fast.min() >= (-2048 if dtype is np.int16 else 0) and fast.max() < 4096
