"""DICOM pixel pipeline: decode, modality LUT, VOI LUT / window, MONOCHROME1 inversion, frames.

pydicom's `pixel_array` gives stored values; MONAI's PydicomReader does not invert MONOCHROME1 nor apply
the VOI LUT, so the display pipeline of PS3.3 C.11 is applied here explicitly:
stored value -> modality LUT (rescale slope/intercept or LUT) -> VOI (LUT or window) -> [0, 1] ->
inverted for MONOCHROME1 so that "bright = dense" holds for every image in the store.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from pipeline.ingest import reasons as R
from pipeline.ingest.dicom_codecs import decode_failure, undecodable
from pipeline.ingest.reasons import NOTE, Rejected

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
# Image storage SOP classes whose name lacks "Image Storage" (see sop_class_kind)
EXTRA_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.6.2"}  # Enhanced US Volume Storage


@dataclass
class DicomInfo:
    """Header facts. The *_uid / patient_id fields hold PHI-grade identifiers: only hashed downstream."""

    sop_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    manufacturer: str
    photometric: str
    transfer_syntax: str
    rows: int
    cols: int
    frames: int
    spacing: tuple[float, float] | None  # (row, col) mm
    position: tuple[float, float, float] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6)
    slice_thickness: float | None
    age: str
    sex: str
    extra: dict[str, Any] = field(default_factory=dict)


def _first(v: Any) -> Any:
    if isinstance(v, pydicom.multival.MultiValue | list | tuple):
        return v[0] if len(v) else None
    return v


def _floats(v: Any, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _shared_or_per_frame(ds: Dataset, seq: str, attr: str) -> Any:
    """An attribute from the (shared, then first per-frame) functional groups of enhanced multi-frame."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        g = ds.get(groups)
        if g and seq in g[0] and len(g[0][seq].value):
            item = g[0][seq][0]
            if attr in item:
                return item.get(attr)
    return None


def read_dataset(data: bytes | BinaryIO, header_only: bool = False) -> Dataset:
    """Read like `dcmread(force=True)`: files without preamble or file-meta header (ACR-NEMA style) too.
    `data`: the file's bytes or an open binary file (read from its start). Without a Transfer Syntax UID
    the syntax pydicom detected while reading (implicit/explicit VR, byte order) is written into the
    file meta, so the pixel data can be decoded (noted as `transfer_syntax_inferred`)."""
    src = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    src.seek(0)
    try:
        ds = pydicom.dcmread(src, force=True, stop_before_pixels=header_only)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError, AttributeError) as e:
        raise Rejected(R.UNREADABLE, f"not a readable DICOM file ({type(e).__name__})") from None
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is not None:
            meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian
                if implicit
                else (ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian)
            )
            warnings.warn(NOTE + "transfer_syntax_inferred", stacklevel=2)
    return ds


def sop_class_kind(ds: Dataset) -> tuple[str, str, str]:
    """(kind, uid, name) of a dataset's SOP Class: kind "image", "not_image", "dicomdir" or "unknown"
    (no SOP Class UID, or one pydicom does not know, e.g. a private class).

    Decided by the SOP Class UID alone (docs/ingest.md, "Which DICOM objects are images"): segmentations,
    RT Dose/Structure Set/Plan, SR, presentation states, key object notes, raw data, waveforms and other
    non-image storage classes never enter the store, whether or not they carry Pixel Data.
    """
    meta = getattr(ds, "file_meta", None)
    uid = str(
        ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else "") or ""
    )
    uid = uid.strip().rstrip("\x00").strip()
    if uid == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        return "dicomdir", uid or MediaStorageDirectoryStorage, "Media Storage Directory Storage"
    known = UID(uid) if uid else None
    if known is None or not known.keyword:  # not in pydicom's UID dictionary
        return "unknown", uid, ""
    name = str(known.name)
    if "Image Storage" in name or uid in EXTRA_IMAGE_CLASSES:
        return "image", uid, name
    return "not_image", uid, name


def header_info(ds: Dataset) -> DicomInfo:
    if "SOPClassUID" not in ds and "PixelData" not in ds and "Rows" not in ds:
        raise Rejected(R.UNREADABLE, "no DICOM image attributes (not a DICOM file or truncated header)")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    spacing = _floats(
        ds.get("PixelSpacing") or _shared_or_per_frame(ds, "PixelMeasuresSequence", "PixelSpacing") or [], 2
    )
    pos = _floats(ds.get("ImagePositionPatient") or [], 3)
    ori = _floats(
        ds.get("ImageOrientationPatient")
        or _shared_or_per_frame(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
        or [],
        6,
    )
    try:
        thick = float(ds.get("SliceThickness")) if ds.get("SliceThickness") not in (None, "") else None
    except (TypeError, ValueError):
        thick = None
    return DicomInfo(
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        photometric=str(ds.get("PhotometricInterpretation", "") or ""),
        transfer_syntax=str(ts or ""),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        spacing=spacing,  # type: ignore[arg-type]
        position=pos,  # type: ignore[arg-type]
        orientation=ori,
        slice_thickness=thick,
        age=str(ds.get("PatientAge", "") or ""),
        sex=str(ds.get("PatientSex", "") or ""),
    )


def check_sop_class(ds: Dataset) -> str:
    """Reject a DICOMDIR or a non-image SOP class (by its UID); returns the class name ("" if unknown)."""
    kind, uid, name = sop_class_kind(ds)
    if kind == "dicomdir":
        raise Rejected(
            R.DICOMDIR, "a DICOMDIR (media directory index), not an image; its images are read as files"
        )
    if kind == "not_image":
        raise Rejected(R.NOT_IMAGE_OBJECT, f"SOP Class UID {uid} ({name}) is not an image storage class")
    return name


def check_image_object(ds: Dataset, header_only: bool = False) -> None:
    """Reject non-image objects by SOP Class UID, and image objects without pixel data. A dataset read
    without its pixels (`header_only`) is judged on its SOP class only."""
    name = check_sop_class(ds)
    if not header_only and not any(t in ds for t in PIXEL_TAGS):
        raise Rejected(R.NO_PIXEL_DATA, f"'{name or 'image'}' object has no pixel data")


def check_decodable(ds: Dataset) -> None:
    """Reject a compressed transfer syntax no installed plugin decodes, naming the syntax (name and UID)
    and the package that would decode it (pipeline/ingest/dicom_codecs.py)."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None or not ts.is_compressed:
        return
    try:
        dec = get_decoder(ts)
    except NotImplementedError:
        raise undecodable(ts, "has no pixel data decoder in pydicom") from None
    if not dec.is_available:
        raise undecodable(ts, "cannot be decoded here: no decoder plugin for it is installed")


# what pydicom raises for pixel data it cannot decode (a corrupt or truncated stream, a bad header value)
DECODE_ERRORS = (ValueError, RuntimeError, AttributeError, EOFError, KeyError, TypeError, NotImplementedError)


def _modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if "RescaleSlope" in ds:
        slope, inter = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    else:  # enhanced multi-frame keeps rescale in functional groups
        slope = _shared_or_per_frame(ds, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _shared_or_per_frame(ds, "PixelValueTransformationSequence", "RescaleIntercept")
    out = arr.astype(np.float32)
    if slope is not None and slope != "":
        # y = slope * x + intercept (PS3.3 C.11.1), in place in float32
        if float(slope) != 1.0:
            out *= np.float32(float(slope))
        if float(inter or 0.0) != 0.0:
            out += np.float32(float(inter or 0.0))
    return out


def window_linear(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 window to [0, 1] (LINEAR, LINEAR_EXACT or SIGMOID)."""
    f = function.upper()
    x = np.asarray(x, dtype=np.float32)
    if f == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - np.float32(center)) / np.float32(width)))).astype(np.float32)
    if f == "LINEAR_EXACT":
        a, b = 1.0 / width, 0.5 - center / width
    else:
        w1 = max(width - 1.0, 1e-6)
        a, b = 1.0 / w1, 0.5 - (center - 0.5) / w1
    y = x * np.float32(a)  # one affine pass + in-place clip: this runs on every pixel of every file
    y += np.float32(b)
    return np.clip(y, 0.0, 1.0, out=y)


def minmax(x: np.ndarray, lohi: tuple[float, float] | None = None) -> np.ndarray:
    """x -> [0, 1] by its own min and max, or by `lohi` (the range of the whole file when x is one frame)."""
    lo, hi = lohi if lohi is not None else (float(np.min(x)), float(np.max(x)))
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def voi_rule(ds: Dataset, voi: str, window: dict[str, float] | None) -> str:
    """Which VOI rule `_voi` applies to this dataset's grey values (known from the header alone)."""
    if voi == "manifest" and window is not None:
        return "manifest_window"
    if voi == "header":
        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            return "voi_lut"
        if _header_window(ds) is not None:
            return "header_window"
    return "minmax"


def _header_window(ds: Dataset) -> tuple[float, float] | None:
    c = _first(ds.get("WindowCenter"))
    w = _first(ds.get("WindowWidth"))
    if c is None or w is None:
        c = _shared_or_per_frame(ds, "FrameVOILUTSequence", "WindowCenter")
        w = _shared_or_per_frame(ds, "FrameVOILUTSequence", "WindowWidth")
        c, w = _first(c), _first(w)
    if c is not None and w is not None and float(w) > 0:
        return float(c), float(w)
    return None


def _voi(
    x: np.ndarray,
    ds: Dataset,
    voi: str,
    window: dict[str, float] | None,
    lohi: tuple[float, float] | None = None,
) -> tuple[np.ndarray, str]:
    """Stored-after-modality values -> [0, 1]; returns the rule used (logged in the index). `lohi`: the
    min-max range to use instead of x's own (x is one frame of a multi-frame file)."""
    rule = voi_rule(ds, voi, window)
    if rule == "manifest_window":
        assert window is not None
        return window_linear(x, float(window["center"]), float(window["width"])), rule
    if rule == "voi_lut":
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        # a LUT is indexed by integer modality values
        y = np.asarray(
            apply_voi_lut(np.rint(x).astype(np.int32), ds, index=0, prefer_lut=True), dtype=np.float32
        )
        return np.clip(y / float(2**bits - 1), 0.0, 1.0), rule
    if rule == "header_window":
        cw = _header_window(ds)
        assert cw is not None
        fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        return window_linear(x, cw[0], cw[1], fn), rule
    return minmax(x, lohi), rule


def _native_grey(ds: Dataset) -> np.ndarray | None:
    """Uncompressed little-endian greyscale pixel data straight from the buffer, or None (use pydicom).

    `Dataset.pixel_array` spends most of its time on bookkeeping (it re-reads ~30 pixel attributes
    twice to decide whether its cache is stale); for the common native case this does the same
    arithmetic directly: frombuffer, then mask (unsigned) or sign-extend (signed) the unused high bits,
    exactly as pydicom's decoder does. Anything unusual falls back to pydicom.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or ts.is_compressed or not ts.is_little_endian or ts.is_deflated:
        return None
    if "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    if str(ds.get("PhotometricInterpretation", "")).upper() not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    ba, bs = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if ba not in (8, 16, 32) or not 0 < bs <= ba:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{ba // 8}")
    raw = ds.PixelData
    n = frames * rows * cols
    if not isinstance(raw, bytes | bytearray) or len(raw) < n * dtype.itemsize:
        return None  # truncated: pydicom raises the precise error
    arr = np.frombuffer(raw, dtype=dtype, count=n).reshape(frames, rows, cols)
    if bs < ba:
        shift = ba - bs
        arr = (arr << shift) >> shift if signed else arr & dtype.type((1 << bs) - 1)
    return arr


def modality_frames(ds: Dataset) -> tuple[np.ndarray, bool]:
    """Decoded frames after the modality LUT: grey (F, H, W) float32 (True) or colour (F, 3, H, W) in [0, 1]
    (False; RGB, YBR converted by pydicom, PALETTE COLOR via its LUT, scaled by bit depth: no VOI for colour).
    """
    check_image_object(ds)
    check_decodable(ds)
    try:
        arr = _native_grey(ds)
        if arr is None:
            arr = ds.pixel_array  # pydicom 3 converts YBR_FULL(_422) to RGB by default
    except DECODE_ERRORS as e:
        raise decode_failure(e, ds.file_meta.get("TransferSyntaxUID")) from None
    return to_modality(arr, ds, int(ds.get("NumberOfFrames", 1) or 1))


def palette_top(rgb: np.ndarray) -> float:
    """The full scale of PALETTE COLOR output: 65535 once a LUT value exceeds 8 bits, else 255."""
    return 65535.0 if rgb.max() > 255 else 255.0


def to_modality(
    arr: np.ndarray, ds: Dataset, frames: int, colour_top: float | None = None
) -> tuple[np.ndarray, bool]:
    """`frames` decoded frames (as pydicom gives them) -> grey (F, H, W) float32 after the modality LUT
    (True) or colour (F, 3, H, W) in [0, 1] (False). PALETTE COLOR is scaled by `colour_top` (the
    maximum of 255 / 65535 its LUT reaches over the whole file) when the frames are a part of the file."""
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    rows, cols = int(ds.Rows), int(ds.Columns)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        top = colour_top or palette_top(rgb)
        y = np.clip(rgb.reshape((frames, rows, cols, 3)).astype(np.float32) / top, 0, 1)
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2)), False
    if spp == 1:
        try:
            arr = arr.reshape((frames, rows, cols))
        except ValueError:
            raise Rejected(
                R.UNREADABLE, f"pixel data size {arr.size} does not match {frames}x{rows}x{cols}"
            ) from None
        return _modality_lut(arr, ds), True
    bits = int(ds.get("BitsStored", 8) or 8)
    arr = arr.reshape((frames, rows, cols, spp))[..., :3]
    y = np.clip(arr.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2)), False


def presentation_inverse(ds: Dataset) -> bool:
    """Whether the grey output is inverted for display: MONOCHROME1 (minimum = white), or a Presentation
    LUT Shape of INVERSE (PS3.3 C.11.6). For MONOCHROME1 the standard's INVERSE shape (DX, MG) states the
    same inversion, so it is applied once, never twice; IDENTITY leaves MONOCHROME1's own inversion."""
    mono1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return mono1 or shape == "INVERSE"


def to_unit(
    x: np.ndarray,
    ds: Dataset,
    voi: str = "header",
    window: dict[str, float] | None = None,
    lohi: tuple[float, float] | None = None,
) -> tuple[np.ndarray, str]:
    """Grey modality values (any shape) -> [0, 1] by VOI LUT / window / min-max (over `lohi` if given),
    then inverted for MONOCHROME1 or Presentation LUT Shape INVERSE (`presentation_inverse`), so bright =
    dense."""
    y, rule = _voi(x, ds, voi, window, lohi)
    if presentation_inverse(ds):
        y = 1.0 - y
        rule += "+inverted"
    return y, rule


def decode_frames(
    ds: Dataset, voi: str = "header", window: dict[str, float] | None = None
) -> tuple[np.ndarray, str]:
    """All frames of a DICOM image as float32 in [0, 1]: (F, C, H, W), C = 1 (grey) or 3 (colour).

    Min-max (when no window applies) spans all frames of the file, so frames of one acquisition keep
    their relative brightness.
    """
    x, grey = modality_frames(ds)
    if not grey:
        return x, "rgb_bitdepth"
    y, rule = to_unit(x, ds, voi, window)
    return y[:, None], rule  # (F, 1, H, W)
