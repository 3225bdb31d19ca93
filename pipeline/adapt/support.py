"""Reading a labelled support (or query) set and the scans to predict, exactly as ingest would.

A set is either a folder with one subfolder per class (`Hernia/`, `No Finding/`, files may sit in
nested series folders) or a label CSV with the columns `path,label` (relative paths resolve against the
CSV's folder; for a 3D model a row may name a series folder). Every scan goes through the ingest
preprocessing of the meta-model's own ingest run (`pipeline.ingest.preprocess.load_for_model`, and for a
DICOM series ingest's `decode_series`), so support, query and training images are identical in geometry,
windowing and normalisation.

3D meta-models (scans stored as (C, D, H, W)): a scan is a NIfTI volume, a multi-frame DICOM volume, or a
DICOM series, i.e. the single-frame slices of a class folder (or CSV row) that share a SeriesInstanceUID,
grouped by ingest's own header pass (`pipeline.ingest.worker.run_task`, kind "header") and decoded once
per series, ordered along the slice normal. A 2-D image given to a 3-D model, or a volume to a 2-D
model, is a ScanMismatch that names both geometries.

De-identification: a scan is known outside this module only by a salted hash of its *content* (the same
salt file as ingest, kept outside MLflow), so nothing written to MLflow holds a file name, and the same
scan in support and query is detected whatever it is called. A folder or file name can hold a patient name
(`DOE^JOHN/scan.dcm`), and stderr ends up in CI logs and terminals, so log lines name a file only by its
salted file key (ingest's convention: `salted_key(salt, "file", path)`, same salt file) and point at the
local-only report (`PathLedger`, next to the salt, never uploaded) that maps the key back to the clear path.
Exceptions name the problem and the fix but never a path (an error's text is recorded in MLflow).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from pipeline.errors import ConfigError, DataError, FewscanError, ScanRejectedError
from pipeline.ingest.deid import salted_key
from pipeline.progress import log, progress

# Files in a scan folder that are never scans (a README next to the DICOMs is not an "unreadable scan").
NON_SCAN_SUFFIXES = frozenset(
    {".txt", ".md", ".csv", ".tsv", ".json", ".yaml", ".yml", ".xml", ".html", ".pdf"}
)


class ScanMismatch(DataError):
    """A readable scan that does not fit the meta-model (other modality, channels or spatial dims)."""


@dataclass(frozen=True)
class ScanRef:
    path: Path  # the scan's file; for a DICOM series, the folder that holds its slices
    label: str | None  # None for unlabelled scans (predict)
    shown: str  # path relative to the set's root: local only, never for MLflow nor logs (they use file keys)
    members: tuple[Path, ...] = ()  # the slice files of a DICOM series (3D), sorted; () for a single file


@dataclass(frozen=True)
class ScanSpec:
    """What the meta-model expects of every scan: ingest's preprocessing and the resulting geometry."""

    preprocessing: dict[str, Any]
    shape: tuple[int, ...]  # (C, H, W) or (C, D, H, W), as stored by ingest
    modalities: frozenset[str] | None = None  # DICOM modalities seen at ingest (None: not checked)

    @property
    def volumetric(self) -> bool:
        """True for a 3D meta-model: its scans are (C, D, H, W) volumes."""
        return len(self.shape) == 4

    def to_json(self) -> dict[str, Any]:
        return {
            "preprocessing": self.preprocessing,
            "shape": list(self.shape),
            "modalities": sorted(self.modalities) if self.modalities is not None else None,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> ScanSpec:
        mods = d.get("modalities")
        return ScanSpec(
            preprocessing=dict(d["preprocessing"]),
            shape=tuple(int(s) for s in d["shape"]),
            modalities=frozenset(mods) if mods is not None else None,
        )


class PathLedger:
    """The local-only record behind the file keys that log lines show instead of clear paths.

    `key(path)` is ingest's file key, `salted_key(salt, "file", <absolute path>)` with ingest's salt;
    `cite(path, note)` records `key -> {path, notes}` in `report` (JSON, next to the salt, never uploaded)
    and returns the text for a log line: "file <key> (clear path in <report>)". The report is merged and
    rewritten atomically (temp file + os.replace), so keys from earlier runs stay resolvable and a crash
    never leaves half a file. With `report=None` nothing is recorded and the citation is the key alone.
    """

    def __init__(self, salt: bytes, report: Path | None):
        self.salt = salt
        self.report = Path(report) if report is not None else None

    def key(self, path: Path | str) -> str:
        return salted_key(self.salt, "file", str(Path(path).resolve()))

    def record(self, entries: Sequence[tuple[Path | str, str]]) -> list[str]:
        """Record several (path, note) at once (one rewrite of the report); their keys, in order."""
        keys = [self.key(p) for p, _ in entries]
        if self.report is None or not entries:
            return keys
        files: dict[str, Any] = {}
        try:
            files = dict(json.loads(self.report.read_text()).get("files") or {})
        except (OSError, ValueError, AttributeError):
            files = {}  # missing or unreadable: start afresh (it only holds local pointers)
        for k, (p, note) in zip(keys, entries):
            entry = files.setdefault(k, {"path": str(Path(p).resolve()), "notes": []})
            if note and note not in entry["notes"]:
                entry["notes"].append(note)
        write_json_atomic(self.report, {"files": files}, private=True)
        return keys

    def where(self) -> str:
        return f"clear path in {self.report}" if self.report is not None else "path not recorded"

    def cite(self, path: Path | str, note: str = "") -> str:
        """Record one path and return how a log line names it."""
        return f"file {self.record([(path, note)])[0]} ({self.where()})"


def _fail(exc: type[FewscanError], msg: str, where: Path | str, ledger: PathLedger | None = None) -> NoReturn:
    """Raise `msg` without the path: an error's text is also recorded in the MLflow run (tag
    fewscan.error), and a path may name a patient. stderr gets the file's key and where the local-only
    report records its clear path (nothing when no ledger is given: the message alone must suffice)."""
    if ledger is not None:
        log(f"{msg} [{ledger.cite(where, msg)}]")
    raise exc(msg)


def _is_candidate(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in NON_SCAN_SUFFIXES


def _files_under(folder: Path) -> list[Path]:
    # sorted: the order of the support set is the order of the rows of x_s, so it must not depend on the
    # file system's enumeration order
    return sorted(
        (p for p in folder.rglob("*") if _is_candidate(p) and not any(s.startswith(".") for s in p.parts)),
        key=lambda p: str(p),
    )


def list_labelled(source: Path, what: str = "support", ledger: PathLedger | None = None) -> list[ScanRef]:
    """The labelled scans of a class-folder tree or a `path,label` CSV, in a deterministic order.

    `ledger`: where log lines about a file record its clear path (see PathLedger)."""
    source = Path(source)
    if not source.exists():
        _fail(
            ConfigError,
            f"{what} set not found (give a folder with one subfolder per class, or a CSV)",
            source,
            ledger,
        )
    if source.is_file():
        return _list_csv(source, what, ledger)
    class_dirs = sorted(
        (d for d in source.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )
    if not class_dirs:
        _fail(
            DataError,
            f"the {what} folder has no class subfolders: put each class's scans in a subfolder named "
            "after the class, e.g. Hernia/ and 'No Finding'/",
            source,
            ledger,
        )
    loose = sorted(p for p in source.iterdir() if _is_candidate(p))
    if loose:
        note = "ignored: directly in the set's folder, not in a class subfolder"
        named = ""
        if ledger is not None:
            keys = ledger.record([(p, note) for p in loose])
            named = f" ({', '.join(f'file {k}' for k in keys)}; {ledger.where()})"
        log(
            f"{what}: ignoring {len(loose)} file(s) directly in the {what} folder{named}: "
            "scans belong in a class subfolder"
        )
    refs: list[ScanRef] = []
    for d in class_dirs:
        files = _files_under(d)
        if not files:
            _fail(
                DataError,
                f"{what} class folder '{d.name}' holds no scan files: add scans of class "
                f"'{d.name}' or remove the empty folder",
                d,
                ledger,
            )
        refs.extend(ScanRef(path=f, label=d.name, shown=str(f.relative_to(source))) for f in files)
    return refs


def _list_csv(path: Path, what: str, ledger: PathLedger | None) -> list[ScanRef]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
            cols = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    except (UnicodeDecodeError, csv.Error) as err:
        _fail(
            ConfigError, f"the {what} label file is not a readable CSV: {scrub(str(err), path)}", path, ledger
        )
    if not rows:
        _fail(
            DataError,
            f"the {what} label file has no rows (expected a header 'path,label' and one row per scan)",
            path,
            ledger,
        )
    if "path" not in cols or "label" not in cols:
        _fail(
            ConfigError,
            f"the {what} label file needs the columns 'path' and 'label'; it has: {', '.join(cols)}",
            path,
            ledger,
        )
    refs: list[ScanRef] = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        norm = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        rel, label = norm["path"], norm["label"]
        if not rel or not label:
            _fail(DataError, f"the {what} label file, line {i}: empty path or label", path, ledger)
        p = Path(rel)
        p = p if p.is_absolute() else path.parent / p
        refs.append(ScanRef(path=p, label=label, shown=rel))
    return refs


def list_inputs(source: Path, ledger: PathLedger | None = None) -> list[ScanRef]:
    """Unlabelled scans to predict: one file, or every candidate file under a folder (recursively)."""
    source = Path(source)
    if source.is_file():
        return [ScanRef(path=source, label=None, shown=str(source))]
    if not source.is_dir():
        _fail(ConfigError, "input not found (give a scan file or a folder of scans)", source, ledger)
    files = _files_under(source)
    if not files:
        # `source` is the --input the user typed (predict; nothing goes to MLflow): shown as typed
        _fail(
            DataError,
            f"--input {source}: the folder holds no scan files (only hidden files or reports/notes such as "
            ".txt, .csv, .json); give the folder that holds the scans",
            source,
            ledger,
        )
    return [ScanRef(path=f, label=None, shown=str(f)) for f in files]


def order_classes(labels: Sequence[str], condition: str | None, normal_label: str) -> list[str]:
    """Label index order: the condition first, the normal class last, any others in between (sorted).

    The same convention as the binary episodes the meta-model was trained and evaluated on
    (`classes == [condition, normal]`), so sensitivity is recall of index 0.
    """
    present = sorted(set(labels))
    if len(present) < 2:
        raise DataError(
            f"the support set has {len(present)} class(es) ({', '.join(present) or 'none'}); "
            "adaptation needs at least two, e.g. the condition and 'No Finding'"
        )
    if condition is None:
        others = [c for c in present if c != normal_label]
        if len(others) != 1:
            raise ConfigError(
                f"cannot tell which class is the condition among {', '.join(present)}: set adapt.condition "
                "(--condition NAME)"
            )
        condition = others[0]
    if condition not in present:
        raise ConfigError(
            f"condition '{condition}' is not a class of the support set; its classes are: {', '.join(present)}"
        )
    middle = [c for c in present if c not in (condition, normal_label)]
    tail = [normal_label] if normal_label in present and normal_label != condition else []
    return [condition, *middle, *tail]


def content_key(salt: bytes, data: bytes) -> str:
    """Salted key of a scan's bytes: stable across renames, unlinkable without the salt."""
    return salted_key(salt, "adapt-scan", hashlib.sha256(data).hexdigest())


def dicom_modality(path: Path) -> str | None:
    """The DICOM Modality of a file, or None when it is not DICOM (PNG, NIfTI, ...) or has none."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
        return None
    mod = str(getattr(ds, "Modality", "") or "").strip().upper()
    return mod or None


def _describe_shape(shape: tuple[int, ...]) -> str:
    kind = {3: "2-D", 4: "3-D"}.get(len(shape), f"{len(shape) - 1}-D")
    return f"{kind}, {shape[0]} channel(s), {'x'.join(str(s) for s in shape[1:])}"


def _dims_mismatch(spec: ScanSpec) -> ScanMismatch:
    """A 2-D image for a 3-D model or a volume for a 2-D one: the set is wrong, not the file."""
    if spec.volumetric:
        return ScanMismatch(
            f"a 2-D image, but the meta-model takes 3-D volumes ({_describe_shape(spec.shape)}): give one "
            "DICOM series folder (all slices of one scan) or one NIfTI volume per scan, or adapt a "
            "meta-model trained on 2-D images"
        )
    return ScanMismatch(
        f"a 3-D volume, but the meta-model takes 2-D images ({_describe_shape(spec.shape)}): give 2-D "
        "scans, or adapt a meta-model trained on 3-D volumes"
    )


def check_array(arr: Any, spec: ScanSpec, *, caller_array: bool = False) -> np.ndarray:
    """An array as the model takes it (shape `spec.shape`, finite) -> float32; else ScanMismatch (shape)
    or DataError (NaN/inf). `caller_array`: the array came preprocessed from the caller (serving), not
    from our own preprocessing, and the messages say what to send instead."""
    arr = np.asarray(arr, dtype=np.float32)
    if tuple(arr.shape) != spec.shape:
        got = _describe_shape(tuple(arr.shape)) if arr.ndim >= 2 else f"shape {tuple(arr.shape)}"
        if caller_array:
            raise ScanMismatch(
                f"an input array has shape {tuple(arr.shape)} ({got}), but the meta-model takes "
                f"{_describe_shape(spec.shape)}, shape {spec.shape}: arrays "
                "must already be preprocessed like the meta-model's store (send the DICOM file or its "
                "bytes otherwise)"
            )
        raise ScanMismatch(f"preprocessed to {got}, but the meta-model takes {_describe_shape(spec.shape)}")
    if not np.all(np.isfinite(arr)):
        if caller_array:
            raise DataError("an input array holds NaN or inf")
        raise DataError("preprocessing produced non-finite values (NaN/inf): the pixel data is corrupt")
    return arr


def _check_modality(mod: str | None, spec: ScanSpec) -> None:
    if spec.modalities and mod is not None and mod not in spec.modalities:
        raise ScanMismatch(
            f"modality {mod}, but the meta-model was trained on {', '.join(sorted(spec.modalities))}"
        )


def read_scan(path: Path, spec: ScanSpec) -> np.ndarray:
    """One scan file (or, for a 3D model, a folder holding one DICOM series) -> the array ingest would
    have stored for it ((C, H, W) or (C, D, H, W) float32), checked against spec.

    Raises DataError when the file cannot be read, ScanMismatch when it is readable but of another
    modality, dimensionality or geometry than the meta-model's training data.
    """
    from pipeline.ingest.preprocess import load_for_model
    from pipeline.ingest.reasons import WRONG_DIMENSIONALITY

    if Path(path).is_dir() and not spec.volumetric:
        raise _dims_mismatch(spec)  # a series folder is one 3-D scan
    if spec.modalities:
        _check_modality(dicom_modality(path), spec)
    try:
        arr = load_for_model(path, spec.preprocessing)
    except ScanRejectedError as err:
        if err.reason == WRONG_DIMENSIONALITY:
            raise _dims_mismatch(spec) from None
        raise
    except (OSError, ValueError, RuntimeError) as err:  # a decoder's own error on a broken file
        raise DataError(f"cannot read scan: {type(err).__name__}: {err}") from None
    return check_array(arr, spec)


def read_series(files: Sequence[tuple[Path, bytes]], spec: ScanSpec) -> np.ndarray:
    """The slices of ONE DICOM series (path, bytes) -> the (C, D, H, W) volume ingest would store,
    decoded once with ingest's `decode_series` (ordered along the slice normal, resampled with MONAI)."""
    from pipeline.ingest.reasons import Rejected as IngestRejected
    from pipeline.ingest.worker import decode_series

    if not spec.volumetric:
        raise _dims_mismatch(spec)
    try:
        arr, facts = decode_series(list(files), spec.preprocessing)
    except IngestRejected as r:
        raise DataError(f"{r.reason}: {r.detail}") from None
    except (OSError, ValueError, RuntimeError, AttributeError, TypeError) as err:  # a decoder's own error
        raise DataError(f"cannot read series: {type(err).__name__}") from None
    _check_modality(str(facts.get("modality") or "").strip().upper() or None, spec)
    return check_array(arr, spec)


def read_ref(ref: ScanRef, spec: ScanSpec) -> np.ndarray:
    """A listed scan (a file, or the slices of a series) -> its preprocessed array, checked against spec."""
    if ref.members:
        return read_series([(p, p.read_bytes()) for p in ref.members], spec)
    return read_scan(ref.path, spec)


def series_key(salt: bytes, datas: Sequence[bytes]) -> str:
    """Content key of a series: its slices' bytes, in any order (file names and order do not matter)."""
    digests = sorted(hashlib.sha256(d).hexdigest() for d in datas)
    return salted_key(salt, "adapt-scan", hashlib.sha256("\n".join(digests).encode()).hexdigest())


def scan_units(
    refs: Sequence[ScanRef], spec: ScanSpec, ledger: PathLedger | None = None, what: str = "support"
) -> list[ScanRef]:
    """The scans of a listing: for a 2D model the files themselves; for a 3D model, single-frame DICOM
    slices grouped into one scan per (label, series) with ingest's header pass, and a listed folder
    (a CSV row naming a series folder) expanded first. Other files (NIfTI, multi-frame DICOM) stay one
    scan each; a header that cannot be read leaves the file alone (it is reported when read).
    A series keeps the place of its first slice, so the order stays deterministic."""
    if not spec.volumetric:
        return list(refs)
    from pipeline.ingest.discover import sniff
    from pipeline.ingest.worker import Task, run_task

    files: list[ScanRef] = []
    for r in refs:
        if r.path.is_dir():
            files += [
                ScanRef(path=f, label=r.label, shown=f"{r.shown}/{f.relative_to(r.path).as_posix()}")
                for f in _files_under(r.path)
            ]
        else:
            files.append(r)
    salt = ledger.salt if ledger is not None else b""  # series keys only group here; never shown
    prep = dict(spec.preprocessing)
    out: list[ScanRef | tuple[str | None, str]] = []
    series: dict[tuple[str | None, str], list[ScanRef]] = {}
    sops: dict[tuple[str | None, str], set[str]] = {}
    dropped: list[ScanRef] = []
    for r in files:
        if sniff(r.path) != "dicom":
            out.append(r)
            continue
        res = run_task(Task("header", [str(r.path)], [r.shown], "dicom", prep, salt, None))
        it = res["items"][0] if res.get("ok") else {}
        if not it.get("series_key") or int(it.get("frames", 1)) > 1:
            out.append(r)
            continue
        group = (r.label, str(it["series_key"]))
        if group not in series:
            series[group], sops[group] = [], set()
            out.append(group)
        if it.get("sop_key") and it["sop_key"] in sops[group]:
            dropped.append(r)  # ingest's rule: a repeated SOPInstanceUID is the same slice again
            continue
        sops[group].add(str(it.get("sop_key") or ""))
        series[group].append(r)
    if dropped:
        named = ""
        if ledger is not None:
            keys = ledger.record(
                [(r.path, f"{what}: duplicate slice of a series, left out") for r in dropped]
            )
            named = f" ({', '.join(f'file {k}' for k in keys)}; {ledger.where()})"
        log(f"{what}: left out {len(dropped)} repeated slice(s) (same SOPInstanceUID in one series){named}")
    units: list[ScanRef] = []
    for u in out:
        if isinstance(u, ScanRef):
            units.append(u)
            continue
        members = series[u]
        if len(members) == 1:  # one slice is a 2-D image: read alone, it is refused as such
            units.append(members[0])
            continue
        folder = Path(os.path.commonpath([str(m.path.parent) for m in members]))
        shown = os.path.commonpath([str(Path(m.shown).parent) for m in members])
        units.append(
            ScanRef(path=folder, label=u[0], shown=shown, members=tuple(sorted(m.path for m in members)))
        )
    return units


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


def scrub(text: str, path: Path) -> str:
    """A reader's message without the file's path or name (those may carry PHI; MLflow gets keys only)."""
    for token in (str(path.resolve()), str(path), path.name):
        if token:
            text = text.replace(token, "<file>")
    return text.removeprefix("<file>: ")


@dataclass
class Rejected:
    ref: ScanRef
    key: str
    reason: str


@dataclass
class LabelledSet:
    """A labelled set ready for the inner loop: x (n, C, H, W) float32, y (n,) int64 = index in classes."""

    classes: list[str]
    x: torch.Tensor
    y: torch.Tensor
    keys: list[str]
    rejected: list[Rejected] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c = Counter(int(v) for v in self.y.tolist())
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    def report(self) -> dict[str, Any]:
        """De-identified summary for MLflow: salted keys, class names, reasons; no paths."""
        return {
            "classes": self.classes,
            "counts": self.counts(),
            "accepted": [
                {"scan_key": k, "label": self.classes[int(v)]} for k, v in zip(self.keys, self.y.tolist())
            ],
            "rejected": [
                {"scan_key": r.key, "label": r.ref.label, "reason": r.reason} for r in self.rejected
            ],
        }

    def local_report(self) -> dict[str, Any]:
        """Same with clear paths: written only next to the salt, never to MLflow."""
        return {
            "rejected": [
                {"path": str(r.ref.path), "scan_key": r.key, "reason": r.reason} for r in self.rejected
            ],
        }


def load_labelled(
    refs: Sequence[ScanRef],
    classes: Sequence[str],
    spec: ScanSpec,
    salt: bytes,
    min_per_class: int = 1,
    what: str = "support",
    reader: Callable[[Path, ScanSpec], np.ndarray] = read_scan,
    ledger: PathLedger | None = None,
) -> LabelledSet:
    """Read and preprocess every scan; unreadable ones are reported and skipped if enough remain.

    A scan that is readable but does not match the meta-model refuses the whole set: a CT among chest
    radiographs means the wrong folder was given, and silently dropping it would hide that.
    Log lines name a file by its key; `ledger` records the clear paths locally (None: keys only).
    """
    ledger = ledger if ledger is not None else PathLedger(salt, None)
    refs = scan_units(refs, spec, ledger, what)  # 3D: one ref per DICOM series, not per slice
    index = {c: i for i, c in enumerate(classes)}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    keys: list[str] = []
    seen: dict[str, str] = {}  # key -> label
    rejected: list[Rejected] = []
    mismatched: list[tuple[ScanRef, str]] = []
    for ref in progress(refs, total=len(refs), desc=f"reading {what} scans"):
        if ref.label not in index:
            _fail(
                DataError,
                f"a {what} scan has label '{ref.label}', not one of the support classes: {', '.join(classes)}",
                ref.path,
                ledger,
            )
        if not ref.members and ref.path.is_dir():  # a CSV row naming a folder, for a 2D model
            mismatched.append((ref, str(_dims_mismatch(spec))))
            continue
        try:
            datas = [m.read_bytes() for m in ref.members] if ref.members else [ref.path.read_bytes()]
        except OSError as err:
            rejected.append(
                Rejected(
                    ref,
                    salted_key(salt, "adapt-path", str(ref.path)),
                    f"cannot open file: {err.strerror or type(err).__name__}",
                )
            )
            continue
        key = series_key(salt, datas) if ref.members else content_key(salt, datas[0])
        if key in seen:
            if seen[key] != ref.label:
                _fail(
                    DataError,
                    f"the same scan appears in {what} classes '{seen[key]}' and '{ref.label}': "
                    "a scan can have only one label here",
                    ref.path,
                    ledger,
                )
            dup = ledger.cite(ref.path, f"{what}: duplicate of another '{ref.label}' scan, used once")
            log(f"{what}: {dup} is a duplicate of another '{ref.label}' scan; using it once")
            continue
        try:
            # a series is decoded once, from the bytes already read for its key
            arr = read_series(list(zip(ref.members, datas)), spec) if ref.members else reader(ref.path, spec)
        except ScanMismatch as err:
            mismatched.append((ref, scrub(str(err), ref.path)))
            continue
        except DataError as err:
            rejected.append(Rejected(ref, key, scrub(str(err), ref.path)))
            continue
        seen[key] = ref.label
        xs.append(arr)
        ys.append(index[ref.label])
        keys.append(key)

    # one rewrite of the local report for all of them, then one line each naming the file by its key
    notes = [(r.ref.path, f"{what}: skipped unreadable scan: {r.reason}") for r in rejected]
    notes += [(ref.path, f"{what}: does not match the meta-model: {why}") for ref, why in mismatched]
    file_keys = ledger.record(notes)
    for k, r in zip(file_keys, rejected):
        log(f"{what}: skipped unreadable scan, file {k} ({ledger.where()}): {r.reason}")
    if mismatched:
        for k, (_ref, why) in zip(file_keys[len(rejected) :], mismatched):
            log(f"{what}: file {k} ({ledger.where()}) does not match the meta-model: {why}")
        reasons = Counter(why for _, why in mismatched)
        top, n_top = reasons.most_common(1)[0]
        raise ScanMismatch(
            f"{len(mismatched)} of {len(refs)} {what} scans do not match the meta-model ({n_top}x: {top}); "
            "they are listed above. Use scans of the modality and kind the meta-model was trained on, or "
            "meta-train on data like them"
        )
    counts = Counter(ys)
    short = {c: counts.get(i, 0) for i, c in enumerate(classes) if counts.get(i, 0) < min_per_class}
    if short:
        bad = Counter(r.ref.label for r in rejected)
        parts = [
            f"'{c}': {n} readable" + (f" ({bad[c]} unreadable)" if bad.get(c) else "")
            for c, n in short.items()
        ]
        raise DataError(
            f"too few {what} scans: {'; '.join(parts)}; every class needs at least {min_per_class} "
            f"(adapt.min_per_class). Add readable scans to those classes"
        )
    x = torch.from_numpy(np.stack(xs)) if xs else torch.empty(0)
    return LabelledSet(
        classes=list(classes),
        x=x,
        y=torch.tensor(ys, dtype=torch.int64),
        keys=keys,
        rejected=rejected,
    )


def write_json_atomic(path: Path, obj: Any, private: bool = False) -> None:
    """Write JSON via a temp file + os.replace, so a crash never leaves a half-written report.
    `private`: owner-only (0600 file, new folders 0700), for the local reports that hold clear paths."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    if private:
        os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
