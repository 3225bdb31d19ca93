"""Reading scans for adapt and predict exactly as ingest would, through ingest's API
(`pipeline/ingest/reading.py`): one file with `load_for_model`, the slices of a DICOM series with
`read_series`, and the grouping of slices into series with ingest's own header pass and `group_series`.
Support, query, predicted and training images are therefore identical in geometry, windowing and
normalisation.

3D meta-models (scans stored as (C, D, H, W)): a scan is a NIfTI volume, a multi-frame DICOM volume, or a
DICOM series, i.e. the single-frame slices of a class folder (or CSV row) that share a SeriesInstanceUID,
decoded once per series, ordered along the slice normal. A 2-D image given to a 3-D model, or a volume to
a 2-D model, is a ScanMismatch that names both geometries.

A scan is known outside this module only by a salted hash of its *content* (`content_key`, `series_key`;
the same salt file as ingest, kept outside MLflow), so nothing written to MLflow holds a file name, and
the same scan in support and query is detected whatever it is called.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.adapt.ledger import PathLedger, scrub
from pipeline.adapt.listing import ScanRef, files_under
from pipeline.adapt.scan_spec import ScanSpec, check_array, check_modality, dicom_modality, dims_mismatch
from pipeline.errors import DataError, ScanRejectedError
from pipeline.ingest import reading
from pipeline.ingest import reasons as R
from pipeline.ingest.deid import salted_key
from pipeline.ingest.discover import sniff
from pipeline.progress import log


def content_key(salt: bytes, data: bytes) -> str:
    """Salted key of a scan's bytes: stable across renames, unlinkable without the salt."""
    return salted_key(salt, "adapt-scan", hashlib.sha256(data).hexdigest())


def series_key(salt: bytes, datas: Sequence[bytes]) -> str:
    """Content key of a series: its slices' bytes, in any order (file names and order do not matter)."""
    digests = sorted(hashlib.sha256(d).hexdigest() for d in datas)
    return salted_key(salt, "adapt-scan", hashlib.sha256("\n".join(digests).encode()).hexdigest())


def read_scan(path: Path, spec: ScanSpec) -> np.ndarray:
    """One scan file (or, for a 3D model, a folder holding one DICOM series) -> the array ingest would
    have stored for it ((C, H, W) or (C, D, H, W) float32), checked against spec.

    Raises DataError when the file cannot be read, ScanMismatch when it is readable but of another
    modality, dimensionality or geometry than the meta-model's training data.
    """
    if Path(path).is_dir() and not spec.volumetric:
        raise dims_mismatch(spec)  # a series folder is one 3-D scan
    if spec.modalities:
        check_modality(dicom_modality(path), spec)
    try:
        arr = reading.load_for_model(path, spec.preprocessing)
    except ScanRejectedError as err:
        if err.reason == R.WRONG_DIMENSIONALITY:
            raise dims_mismatch(spec) from None
        raise
    except (OSError, ValueError, RuntimeError) as err:  # a decoder's own error on a broken file
        raise DataError(f"cannot read scan: {type(err).__name__}: {err}") from None
    return check_array(arr, spec)


def read_series(files: Sequence[tuple[Path, bytes]], spec: ScanSpec) -> np.ndarray:
    """The slices of ONE DICOM series (path, bytes) -> the (C, D, H, W) volume ingest would store,
    decoded once with ingest's `read_series` (ordered along the slice normal, resampled with MONAI)."""
    if not spec.volumetric:
        raise dims_mismatch(spec)
    try:
        vol = reading.read_series(files, spec.preprocessing)
    except ScanRejectedError:
        raise  # "<reason>: <detail>", ingest's reason code: reported as an unreadable scan
    except (OSError, ValueError, RuntimeError, AttributeError, TypeError) as err:  # a decoder's own error
        raise DataError(f"cannot read series: {type(err).__name__}") from None
    check_modality(vol.modality, spec)
    return check_array(vol.array, spec)


def read_ref(ref: ScanRef, spec: ScanSpec) -> np.ndarray:
    """A listed scan (a file, or the slices of a series) -> its preprocessed array, checked against spec."""
    if ref.members:
        return read_series([(p, p.read_bytes()) for p in ref.members], spec)
    return read_scan(ref.path, spec)


def scan_units(
    refs: Sequence[ScanRef], spec: ScanSpec, ledger: PathLedger | None = None, what: str = "support"
) -> list[ScanRef]:
    """The scans of a listing: for a 2D model the files themselves; for a 3D model, single-frame DICOM
    slices grouped into one scan per (label, series) by ingest's own grouping (`group_series`, on
    ingest's header pass), and a listed folder (a CSV row naming a series folder) expanded first. Other
    files (NIfTI, multi-frame DICOM) stay one scan each; a file the grouping cannot place (unreadable
    header, no SeriesInstanceUID) is left alone too and reported when read, and so is a series of one
    slice (a 2-D image). A scan keeps the place of its first file, so the order stays deterministic."""
    if not spec.volumetric:
        return list(refs)
    files: list[ScanRef] = []
    for r in refs:
        if r.path.is_dir():
            files += [
                ScanRef(path=f, label=r.label, shown=f"{r.shown}/{f.relative_to(r.path).as_posix()}")
                for f in files_under(r.path)
            ]
        else:
            files.append(r)
    salt = ledger.salt if ledger is not None else b""  # series keys only group here; never shown
    prep = dict(spec.preprocessing)
    heads = [
        reading.read_header(r.path, r.shown, prep, salt) if sniff(r.path) == "dicom" else None for r in files
    ]
    groups = reading.group_series(files, heads, group=lambda r: r.label)
    if groups.duplicates:
        dropped = [r for r, _kept in groups.duplicates]
        named = ""
        if ledger is not None:
            keys = ledger.record(
                [(r.path, f"{what}: duplicate slice of a series, left out") for r in dropped]
            )
            named = f" ({', '.join(f'file {k}' for k in keys)}; {ledger.where()})"
        log(f"{what}: left out {len(dropped)} repeated slice(s) (same SOPInstanceUID in one series){named}")
    placed: list[tuple[int, ScanRef]] = [(pos, r) for pos, r, _head in groups.unreadable]
    placed += groups.no_series
    for u in groups.units:
        members = u.files
        if len(members) == 1:  # a file alone; one slice is a 2-D image: read alone, it is refused as such
            placed.append((u.position, members[0]))
            continue
        folder = Path(os.path.commonpath([str(m.path.parent) for m in members]))
        shown = os.path.commonpath([str(Path(m.shown).parent) for m in members])
        ref = ScanRef(
            path=folder, label=members[0].label, shown=shown, members=tuple(sorted(m.path for m in members))
        )
        placed.append((u.position, ref))
    return [r for _, r in sorted(placed, key=lambda pr: pr[0])]


def read_scan_bytes(data: bytes, spec: ScanSpec, suffix: str = ".dcm") -> np.ndarray:
    """Like read_scan for a scan held in memory (a DICOM file's bytes, e.g. from a scoring request)."""
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="fewscan-scan-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            return read_scan(Path(name), spec)
        except DataError as err:  # the temp file's name means nothing to the caller
            raise type(err)(scrub(str(err), Path(name)).replace("<file>", "the scan")) from None
    finally:
        os.unlink(name)
