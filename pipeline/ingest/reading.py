"""The ingest API for reading scans: what ingest does to a file, for ingest itself and for adapt/predict.

Two things are shared, so that a scan adapted on or predicted is the scan ingest would have stored:

* which DICOM files make one 3D scan: `read_header` (ingest's header pass, on one file) and
  `group_series` (single-frame slices grouped by SeriesInstanceUID, a repeated SOPInstanceUID left out,
  multi-frame files alone). Ingest (`pipeline/ingest/build.py`) and adapt/predict
  (`pipeline/adapt/scan_read.py`) call this one function and differ only in what they do with a file it
  cannot place (ingest rejects it with a reason code; adapt reads it alone, and reports why it fails);
* the decode itself: `load_for_model` (one file, or a folder holding one series) and `read_series` (the
  slices of one series, bytes already read) give the array ingest stores, as float32, and raise
  `ScanRejectedError` carrying ingest's reason code (pipeline/ingest/reasons.py) when ingest would reject
  the scan.

Ingest runs the same decode in worker processes through `pipeline.ingest.worker.run_task` (a `Task` in, a
`TaskResult` out); this module is the in-process view of it for one caller and a handful of scans.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from pipeline.errors import DataError, ScanRejectedError
from pipeline.ingest import worker
from pipeline.ingest.discover import sniff
from pipeline.ingest.reasons import Rejected

T = TypeVar("T")


@dataclass(frozen=True)
class DicomHeader:
    """What the header pass learns of one DICOM file (salted keys only, no clear UID)."""

    ok: bool
    series_key: str = ""
    sop_key: str = ""
    frames: int = 1
    reason: str = ""  # a reasons code when the header could not be read (ok False)
    detail: str = ""
    warnings: dict[str, int] = field(default_factory=dict)  # warning codes, as worker.warning_codes

    @staticmethod
    def from_result(res: worker.TaskResult) -> DicomHeader:
        """The header of a `run_task` result of kind "header"."""
        if not res.ok:
            return DicomHeader(ok=False, reason=res.reason, detail=res.detail, warnings=dict(res.warnings))
        it = res.items[0]
        return DicomHeader(
            ok=True,
            series_key=str(it.get("series_key") or ""),
            sop_key=str(it.get("sop_key") or ""),
            frames=int(it.get("frames", 1)),
            warnings=dict(res.warnings),
        )


def header_task(path: Path | str, rel: str, prep: dict[str, Any], salt: bytes) -> worker.Task:
    """The header pass of one DICOM file as a worker task (ingest runs these in its process pool)."""
    return worker.Task("header", [str(path)], [rel], "dicom", prep, salt, None)


def read_header(path: Path | str, rel: str, prep: dict[str, Any], salt: bytes) -> DicomHeader:
    """ingest's header pass on one DICOM file, in this process. `rel` is only hashed (file_key)."""
    return DicomHeader.from_result(worker.run_task(header_task(path, rel, prep, salt)))


@dataclass
class Unit(Generic[T]):
    """One scan to decode: a file alone (`series_key` ""), or the slices of one series."""

    files: list[T]
    series_key: str
    position: int  # index of its first file in the input, to keep the caller's order


@dataclass
class SeriesGroups(Generic[T]):
    """How `group_series` placed each file: in a unit, or in one of the lists of files it cannot place."""

    units: list[Unit[T]]  # in order of first appearance
    unreadable: list[tuple[int, T, DicomHeader]]  # (position, file, header with the reason)
    no_series: list[tuple[int, T]]  # single-frame slices without a SeriesInstanceUID
    duplicates: list[tuple[T, T]]  # (a repeated slice, left out; the slice of its series that is kept)


def group_series(
    files: Sequence[T],
    headers: Sequence[DicomHeader | None],
    group: Callable[[T], Hashable] | None = None,
) -> SeriesGroups[T]:
    """Group single-frame DICOM slices into one unit per series, as ingest does (docs/ingest.md, "3D").

    `headers[i]` is file i's DicomHeader, or None for a file that is not DICOM (it stays a unit alone, as
    does a multi-frame DICOM file). `group(file)`, when given, splits a series further (adapt: per class
    label, so that a series listed under two classes is two scans and the clash is reported). Within a
    series, a slice whose SOPInstanceUID was seen before is the same slice again: the first one is kept.
    A series of one slice is still a unit of one file with its series key (ingest rejects it as
    inconsistent; adapt reads the slice alone and refuses it as a 2-D image).
    """
    if len(files) != len(headers):
        raise ValueError(f"{len(files)} files but {len(headers)} headers")
    units: list[Unit[T]] = []
    by_series: dict[tuple[Hashable, str], tuple[Unit[T], dict[str, T]]] = {}
    out = SeriesGroups[T](units=units, unreadable=[], no_series=[], duplicates=[])
    for pos, (f, head) in enumerate(zip(files, headers)):
        if head is None or (head.ok and head.frames > 1):
            units.append(Unit([f], "", pos))
        elif not head.ok:
            out.unreadable.append((pos, f, head))
        elif not head.series_key:
            out.no_series.append((pos, f))
        else:
            k = (group(f) if group is not None else None, head.series_key)
            if k not in by_series:
                by_series[k] = (Unit([], head.series_key, pos), {})
                units.append(by_series[k][0])
            unit, sops = by_series[k]
            if head.sop_key and head.sop_key in sops:
                out.duplicates.append((f, sops[head.sop_key]))
                continue
            sops[head.sop_key] = f
            unit.files.append(f)
    return out


def load_for_model(path: Path, preprocessing: dict[str, Any]) -> np.ndarray:
    """ONE scan (a DICOM/NIfTI/PNG/JPEG file, or a folder holding one DICOM series for 3D) -> exactly the
    array ingest stores for it, as float32: (C, H, W) for 2D, (C, D, H, W) for 3D.

    Raises DataError naming the reason when the file is unreadable or holds more than one image
    (ScanRejectedError, carrying ingest's reason code, when ingest itself would reject it).
    """
    p = Path(path)
    prep = dict(preprocessing)
    # pydicom's warnings quote header values (UIDs, ids): never printed, as in ingest (docs/ingest.md)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_for_model(p, prep)


def _load_for_model(p: Path, prep: dict[str, Any]) -> np.ndarray:
    try:
        if p.is_dir():
            if int(prep["spatial_dims"]) != 3:
                raise DataError(f"{p.name} is a folder; only a 3D store takes a DICOM series folder")
            paths = sorted(q for q in p.rglob("*") if q.is_file() and sniff(q) == "dicom")
            arr, _ = worker.decode_series([(q, q.read_bytes()) for q in paths], prep)
            return arr.astype(np.float32)
        if not p.is_file():
            raise DataError(f"scan file {p} does not exist")
        fmt = sniff(p)
        if fmt == "unknown":
            raise DataError(f"{p.name}: unreadable (not a DICOM, NIfTI, PNG or JPEG file)")
        if fmt == "npz":
            raise DataError(f"{p.name}: an npz holds many images; pass one image file")
        items = worker.decode_file(p, fmt, p.read_bytes(), prep)
    except Rejected as r:
        raise ScanRejectedError(f"{p.name}: {r.reason}: {r.detail}", r.reason) from None
    if len(items) != 1:
        raise DataError(
            f"{p.name} holds {len(items)} images (multi-frame); pass a single-frame file or use preprocessing multiframe=first"
        )
    return items[0][0].astype(np.float32)


@dataclass(frozen=True)
class SeriesVolume:
    """One decoded series: the volume ingest would store, and the DICOM Modality of its slices."""

    array: np.ndarray  # (C, D, H, W) float32
    modality: str | None


def read_series(files: Sequence[tuple[Path, bytes]], preprocessing: dict[str, Any]) -> SeriesVolume:
    """The slices (path, bytes) of ONE series -> the volume ingest stores for it, decoded once, ordered
    along the slice normal and resampled exactly as in ingest (`worker.decode_series`).

    Raises ScanRejectedError with ingest's reason code (the message is "<reason>: <detail>", PHI-free)."""
    try:
        with warnings.catch_warnings():  # pydicom's warnings quote header values: never printed
            warnings.simplefilter("ignore")
            arr, facts = worker.decode_series(list(files), dict(preprocessing))
    except Rejected as r:
        raise ScanRejectedError(f"{r.reason}: {r.detail}", r.reason) from None
    mod = str(facts.get("modality") or "").strip().upper() or None
    return SeriesVolume(arr.astype(np.float32), mod)
