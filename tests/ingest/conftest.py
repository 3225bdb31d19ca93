"""Small generated scans for ingest tests. Every identifier here is fake (no PHI in fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

FAKE_PATIENT_ID = "FAKEPID-000123"
FAKE_NAME = "Fakename^Testpatient"


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    patient_id: str = FAKE_PATIENT_ID,
    sop_uid: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_class: str = SecondaryCaptureImageStorage,
    preamble: bool = True,
    compress_rle: bool = False,
    compress: str | None = None,
    **attrs: Any,
) -> Path:
    """Write `pixels` ((H, W) or (F, H, W) uint16/int16/uint8) as a DICOM file with fake identifiers."""
    pixels = np.asarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = FAKE_NAME
    ds.PatientBirthDate = "19000101"
    ds.AccessionNumber = "FAKEACC42"
    ds.InstitutionName = "Fake General Hospital"
    ds.Modality = attrs.pop("Modality", "CR")
    ds.Manufacturer = attrs.pop("Manufacturer", "FakeVendor")
    frames = 1 if pixels.ndim == 2 else pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.HighBit = ds.BitsStored - 1
    if compress_rle or compress:
        from pydicom.uid import RLELossless

        ds.PixelData = pixels.tobytes()
        ds.compress(compress or RLELossless, pixels)
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path


@pytest.fixture
def ramp() -> np.ndarray:
    """A 40x60 uint16 ramp (values 0..1180 along columns): easy to check windowing and aspect ratio."""
    return np.tile((np.arange(60, dtype=np.uint16) * 20), (40, 1))


@pytest.fixture
def prep2d() -> dict[str, Any]:
    from pipeline.ingest.manifest import PreprocessConfig

    return PreprocessConfig(image_size=[32, 32]).model_dump(mode="json")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # salt and cache default to .fewscan/ under the working directory: keep them per-test
    monkeypatch.chdir(tmp_path)


__all__ = ["make_dicom", "FAKE_PATIENT_ID", "FAKE_NAME", "CTImageStorage"]
