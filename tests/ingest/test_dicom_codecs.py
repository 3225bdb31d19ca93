"""Compressed DICOM (issue 14): 12-bit JPEG Extended decodes; a missing decoder is reported as
`undecodable_transfer_syntax` naming the syntax (name and UID) and the package that would decode it.

The 12-bit JPEG Extended files are the two that pydicom ships inside its package (pydicom/data/
test_files; nothing is downloaded): JPGExtended.dcm, and JPEG-lossy.dcm, the same image with a corrupt
codestream (its scan header says a sequential scan stops before coefficient 63).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

from pipeline.ingest import dicom_codecs
from pipeline.ingest import reasons as R
from pipeline.ingest.dicom_codecs import DECODER_PACKAGES, shorten
from pipeline.ingest.dicom_read import modality_frames, read_dataset
from pipeline.ingest.reasons import Rejected
from pipeline.ingest.worker import decode_file
from tests.ingest.conftest import make_dicom

SHIPPED = Path(pydicom.data.__file__).parent / "test_files"  # inside the installed package


def _shipped(name: str) -> Path:
    p = SHIPPED / name
    assert p.is_file(), f"{name} is no longer shipped with pydicom {pydicom.__version__}"
    return p


def _same_size(prep: dict[str, Any], h: int, w: int) -> dict[str, Any]:
    return dict(prep, image_size=[h, w])


def test_12_bit_jpeg_extended_decodes_to_pydicoms_reference_values(tmp_path: Path, prep2d: dict) -> None:
    p = _shipped("JPGExtended.dcm")
    ds = read_dataset(p.read_bytes())
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit and int(ds.BitsStored) == 12
    x, grey = modality_frames(ds)
    assert grey and x.shape == (1, 1024, 256)
    # pydicom's own reference values for this file (its pixels_reference.py, JPGE_16_12_1_0_1F_M2)
    assert x[0, 420, 140] == 244 and x[0, 230, 120] == 95
    assert x.max() > 255  # 12-bit values survived: not squeezed into 8 bits

    # the ingested image equals that of an uncompressed copy of the same stored values
    raw = pydicom.dcmread(p)
    stored = raw.pixel_array
    raw.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    raw.PixelData = stored.astype("<u2").tobytes()
    raw["PixelData"].VR = "OW"
    ref = tmp_path / "uncompressed.dcm"
    raw.save_as(ref)
    prep = _same_size(prep2d, 128, 32)
    (got,) = decode_file(p, "dicom", p.read_bytes(), prep)
    (want,) = decode_file(ref, "dicom", ref.read_bytes(), prep)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1]["transfer_syntax"] == JPEGExtended12Bit


def test_corrupt_12_bit_codestream_is_unreadable_with_the_decoders_whole_message(prep2d: dict) -> None:
    p = _shipped("JPEG-lossy.dcm")
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", p.read_bytes(), prep2d)
    assert e.value.reason == R.UNREADABLE  # a decoder is installed; the stream itself is bad
    detail = e.value.detail
    # libjpeg's explanation, to its last word (the old message kept pydicom's first line only)
    assert "scan stop must be 63 for the sequential operating modes" in detail, detail
    assert "pylibjpeg" in detail


def _without_plugins(monkeypatch: pytest.MonkeyPatch, syntax: str, drop: set[str]) -> None:
    """Simulate a machine where the pydicom plugins `drop` (labels: pylibjpeg, gdcm, pillow, pyjpegls)
    are not installed: pydicom's decoder for `syntax` no longer offers them, and their pip packages read
    as absent."""
    dec = get_decoder(syntax)
    monkeypatch.setattr(dec, "_available", {k: v for k, v in dec._available.items() if k not in drop})
    dists = {
        "pylibjpeg": {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"},
        "gdcm": {"python-gdcm"},
        "pillow": {"pillow"},
        "pyjpegls": {"pyjpegls"},
    }
    gone = set().union(*(dists[d] for d in drop))
    real = dicom_codecs.installed
    monkeypatch.setattr(dicom_codecs, "installed", lambda d: d not in gone and real(d))


def test_12_bit_jpeg_extended_without_libjpeg_names_syntax_and_package(
    monkeypatch: pytest.MonkeyPatch, prep2d: dict
) -> None:
    # GDCM and Pillow stay installed: pydicom offers them, and both refuse 12-bit samples
    _without_plugins(monkeypatch, JPEGExtended12Bit, {"pylibjpeg"})
    p = _shipped("JPGExtended.dcm")
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", p.read_bytes(), prep2d)
    assert e.value.reason == R.UNDECODABLE
    d = e.value.detail
    assert "JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51)" in d, d
    assert "12-bit" in d  # why the installed plugins could not
    assert d.endswith("pip install pylibjpeg pylibjpeg-libjpeg"), d  # whole, not cut mid-word


@pytest.mark.parametrize(
    ("syntax", "hint"),
    [
        (JPEGExtended12Bit, "pip install pylibjpeg pylibjpeg-libjpeg"),
        (JPEGBaseline8Bit, "pip install pylibjpeg pylibjpeg-libjpeg (or pillow / python-gdcm)"),
        (JPEGLosslessSV1, "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
        (JPEGLSLossless, "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg / python-gdcm)"),
        (JPEG2000Lossless, "pip install pylibjpeg pylibjpeg-openjpeg (or pillow / python-gdcm)"),
    ],
)
def test_no_decoder_installed_names_syntax_uid_and_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prep2d: dict, syntax: str, hint: str
) -> None:
    _without_plugins(monkeypatch, syntax, {"pylibjpeg", "gdcm", "pillow", "pyjpegls"})
    assert not get_decoder(syntax).is_available
    p = make_dicom(tmp_path / "enc", np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 20])  # never decoded: rejected before
    ds["PixelData"].VR = "OB"
    ds.save_as(p)
    with pytest.raises(Rejected) as e:
        decode_file(p, "dicom", p.read_bytes(), prep2d)
    assert e.value.reason == R.UNDECODABLE
    assert e.value.detail == (
        f"transfer syntax {UID(syntax).name} ({syntax}) cannot be decoded here: no decoder plugin for it "
        f"is installed; {hint}"
    )


def test_packages_table_covers_every_syntax_pydicom_can_decode() -> None:
    compressed = set()
    for name in dir(pydicom.uid):
        uid = getattr(pydicom.uid, name)
        if isinstance(uid, UID) and uid.is_transfer_syntax and uid.is_compressed:
            try:
                get_decoder(uid)
            except NotImplementedError:
                continue  # no decoder in pydicom at all (MPEG, HEVC, ...): reported as such
            compressed.add(str(uid))
    assert compressed == set(DECODER_PACKAGES)
    wheels = {d for options in DECODER_PACKAGES.values() for o in options for d in o}
    declared = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert all(f'"{w}>=' in declared for w in wheels), "every decoder package is a declared dependency"


def test_long_details_are_cut_between_words() -> None:
    words = [f"word{i:03d}" for i in range(200)]
    out = shorten(" ".join(words), width=120)
    assert len(out) <= 120 and out.endswith(" ...")
    kept = out.removesuffix(" ...").split(" ")
    assert kept == words[: len(kept)]  # every kept word whole, in order
