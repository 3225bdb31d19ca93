"""DICOM writing: full export-like headers (fake PHI), uncompressed or RLE Lossless, atomic writes.

UIDs are derived from the seed (pydicom `generate_uid(entropy_srcs=...)`), and no clock is read, so the
same seed gives byte-identical files.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from pipeline.atomic import atomic_open
from pipeline.demodata.phi import dicom_date
from pipeline.demodata.plan import ImagePlan

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["fewscan-demodata-implementation"])
IMPLEMENTATION_NAME = "FEWSCAN_DEMO_1"


def uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=[f"fewscan-demo:{seed}", *map(str, parts)])


def study_uids(seed: int, im: ImagePlan) -> tuple[str, str, str]:
    """(study, series, instance) UIDs of a planned image."""
    key = (im.patient.identity.patient_id, im.accession)
    return uid(seed, "study", *key), uid(seed, "series", *key), uid(seed, "sop", im.index)


def base_dataset(
    seed: int,
    im: ImagePlan,
    modality: str,
    sop_class: str,
    manufacturer: str,
    model: str,
    software: str,
    station: str,
) -> Dataset:
    """Patient / study / series / equipment modules shared by every object of an exported study."""
    ident = im.patient.identity
    study, series, sop = study_uids(seed, im)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    date = dicom_date(im.study_date)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = im.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = im.study_time
    ds.AccessionNumber = im.accession
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.InstitutionName = ident.institution
    ds.InstitutionAddress = ident.institution_address
    ds.ReferringPhysicianName = ident.referring_physician
    ds.StationName = station
    ds.ManufacturerModelName = model
    ds.SoftwareVersions = software
    ds.DeviceSerialNumber = f"SN{zlib.crc32(model.encode()) % 10**6:06d}"
    ds.PatientName = ident.name
    ds.PatientID = ident.patient_id
    ds.IssuerOfPatientID = ident.institution.split()[0].upper()[:16]
    ds.OtherPatientIDs = ident.other_ids
    ds.PatientBirthDate = dicom_date(ident.birth_date)
    ds.PatientSex = ident.sex
    ds.PatientAge = f"{im.age:03d}Y"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = im.accession[-6:]
    ds.SeriesNumber = int(im.extra.get("series_number", 1))
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    return ds


def finish_and_write(ds: Dataset, path: Path, *, rle: bool, implicit: bool) -> None:
    """Attach file meta, optionally RLE-encode, and write atomically (`pipeline/atomic.py`)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_NAME
    ds.file_meta = meta
    if rle and "PixelData" in ds:
        try:
            ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        except (RuntimeError, ValueError):  # pylibjpeg-rle missing: pydicom's own (slower) encoder
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    with atomic_open(path, "wb") as f:
        ds.save_as(f, enforce_file_format=True)


def set_pixels(ds: Dataset, stored: np.ndarray, bits_stored: int, signed: bool = False) -> None:
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(stored.astype("<i2" if signed else "<u2")).tobytes()


def write_radiograph(seed: int, im: ImagePlan, path: Path, modality: str, stored: np.ndarray, hdr: dict,
                     vendor, station: str) -> None:  # fmt: skip
    sop_class = CR_IMAGE if modality == "CR" else DX_PRESENTATION
    ds = base_dataset(
        seed, im, modality, sop_class, vendor.manufacturer, vendor.model, vendor.software, station
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.StudyDescription = "XR CHEST 1 VIEW" if im.view == "AP" else "XR CHEST PA"
    ds.SeriesDescription = f"CHEST {im.view}"
    ds.ViewPosition = im.view
    ds.PatientOrientation = ["L", "F"]  # displayed facing the patient: their left on the right
    ds.KVP = 110 if im.view == "PA" else 90
    spacing = round(vendor.detector_mm / stored.shape[1], 4)
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PhotometricInterpretation = hdr["PhotometricInterpretation"]
    set_pixels(ds, stored, hdr["BitsStored"])
    ds.WindowCenter = hdr["WindowCenter"]
    ds.WindowWidth = hdr["WindowWidth"]
    ds.VOILUTFunction = "SIGMOID" if vendor.sigmoid_gain > 0 else "LINEAR"
    ds.RescaleIntercept = hdr["RescaleIntercept"]
    ds.RescaleSlope = hdr["RescaleSlope"]
    ds.RescaleType = "US"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    finish_and_write(ds, path, rle=im.rle, implicit=vendor.implicit_vr)


def write_text_sr(seed: int, im: ImagePlan, path: Path, text: str) -> None:
    """A Basic Text SR (a radiology report object): valid DICOM, no pixel data."""
    ds = base_dataset(seed, im, "SR", BASIC_TEXT_SR, "Reporting System", "RIS-Report", "1.0", "RIS01")
    ds.SOPInstanceUID = uid(seed, "sr", im.index)
    ds.SeriesInstanceUID = uid(seed, "sr-series", im.index)
    ds.SeriesNumber = 999
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121070", "DCM", "Findings"
    ds.ConceptNameCodeSequence = [concept]
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", text
    ds.ContentSequence = [item]
    finish_and_write(ds, path, rle=False, implicit=False)
