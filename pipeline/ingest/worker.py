"""Decode work done in the worker processes: one file (or one 3D series) -> stored arrays + PHI-free facts.

Identifiers (UIDs, patient ids) are hashed here, inside the worker, so that nothing identifying crosses
back to the main process, into the decode cache or into any report. The decode cache is keyed by the
file bytes, the relative path, the preprocessing and the salt, so a re-ingest reuses decodes exactly
when the result could not differ.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.atomic import atomic_open
from pipeline.ingest import reasons as R
from pipeline.ingest.deid import age_bin, salt_id, salted_key, sex_code
from pipeline.ingest.preprocess import finish_2d, finish_3d, prep_digest
from pipeline.ingest.reasons import Rejected

Item = tuple[np.ndarray, dict[str, Any]]  # (stored array float16, facts)


def check_size(rows: int, cols: int, prep: dict[str, Any]) -> None:
    """Reject an image whose rows or columns are below `preprocess.min_size` (a 1x1 "image" is none)."""
    low = int(prep.get("min_size") or 1)
    if min(rows, cols) < low:
        raise Rejected(R.TOO_SMALL, f"{rows}x{cols} pixels, below preprocess.min_size {low}")


def is_constant(x: np.ndarray) -> bool:
    """Every value equal after the intensity window: nothing to learn from (e.g. a CT slice entirely
    outside the window, or a blank frame)."""
    return x.size == 0 or float(np.max(x)) - float(np.min(x)) <= 1e-6


# --------------------------------------------------------------------------------------------- decoding


def _dicom_facts(ds: Any) -> dict[str, Any]:
    from pipeline.ingest.dicom_read import header_info

    info = header_info(ds)
    return {
        "_sop_uid": info.sop_uid,
        "_study_uid": info.study_uid,
        "_series_uid": info.series_uid,
        "_patient_id": info.patient_id,
        "modality": info.modality,
        "manufacturer": info.manufacturer,
        "photometric": info.photometric,
        "age_bin": age_bin(info.age) if info.age else "",
        "sex": sex_code(info.sex),
        "spacing": info.spacing,
        "_position": info.position,
        "_orientation": info.orientation,
        "rows": info.rows,
        "cols": info.cols,
        "frames": info.frames,
        "transfer_syntax": info.transfer_syntax,
        "slice_thickness": info.slice_thickness,
        "_ds_spacing_between": float(ds.get("SpacingBetweenSlices") or 0) or None,
    }


def decode_file(path: Path, fmt: str, data: bytes | None, prep: dict[str, Any]) -> list[Item]:
    """One file -> its stored images. Multi-frame DICOM splits per `prep['multiframe']`. `data`: the
    file's bytes, or None for a DICOM file read from `path` as it is decoded (a large file: see
    `STREAM_BYTES`)."""
    from pipeline.ingest import readers

    dims = int(prep["spatial_dims"])
    window = prep.get("window")
    voi = prep["voi"]
    if fmt == "dicom":
        from pipeline.ingest.dicom_read import read_dataset

        if data is not None:
            return _decode_dicom(None, read_dataset(data), prep)
        with open(path, "rb") as fh:
            return _decode_dicom(fh, None, prep)
    if data is None:
        data = path.read_bytes()
    if fmt == "nifti":
        vol, zyx, raw_shape = readers.read_nifti(path, voi, window)  # (1, D, H, W)
        check_size(int(vol.shape[-2]), int(vol.shape[-1]), prep)
        if is_constant(vol):
            raise Rejected(R.CONSTANT_IMAGE, _constant_detail(vol, "minmax"))
        facts: dict[str, Any] = {
            "source_format": "nifti",
            "orig_shape": list(raw_shape),
            "spacing": zyx,
            "modality": "",
            "voi_rule": "manifest_window" if voi == "manifest" else "minmax",
        }
        if dims == 2:
            if vol.shape[1] != 1:
                raise Rejected(
                    R.WRONG_DIMENSIONALITY,
                    f"NIfTI volume {raw_shape} in a 2D ingest; set preprocess.spatial_dims: 3",
                )
            return [(finish_2d(vol[:, 0], prep), dict(facts, spacing=zyx[1:]))]
        if vol.shape[1] == 1:
            raise Rejected(R.WRONG_DIMENSIONALITY, f"2D NIfTI {raw_shape} in a 3D ingest")
        return [(finish_3d(vol, (zyx[0], zyx[1], zyx[2]), prep), facts)]
    if fmt in ("png", "jpeg"):
        if dims == 3:
            raise Rejected(R.WRONG_DIMENSIONALITY, f"{fmt.upper()} images are 2D; this ingest is 3D")
        img, mode, raw_shape = readers.read_raster(data)
        check_size(int(img.shape[-2]), int(img.shape[-1]), prep)
        if is_constant(img):
            raise Rejected(R.CONSTANT_IMAGE, _constant_detail(img, "bitdepth"))
        facts = {
            "source_format": fmt,
            "orig_shape": list(raw_shape),
            "photometric": mode,
            "modality": "",
            "voi_rule": "bitdepth",
        }
        return [(finish_2d(img, prep), facts)]
    if fmt == "npz":
        arrays = readers.npz_arrays(path)
        out = []
        for split, i, x, labs in readers.iter_medmnist(
            arrays, prep["_npz_splits"], prep["_label_names"], dims
        ):
            facts = {
                "source_format": "npz",
                "orig_shape": list(x.shape),
                "npz_split": split,
                "npz_index": i,
                "labels": labs,
                "modality": "",
                "voi_rule": "bitdepth",
            }
            if i == 0:
                check_size(int(x.shape[-2]), int(x.shape[-1]), prep)
            arr = finish_2d(x, prep) if dims == 2 else finish_3d(x, (1.0, 1.0, 1.0), prep)
            out.append((arr, facts))
        return out
    raise Rejected(R.UNREADABLE, "not a DICOM, NIfTI, PNG, JPEG or npz file")


def _decode_dicom(fh: BinaryIO | None, ds: Any, prep: dict[str, Any]) -> list[Item]:
    """A DICOM file -> its stored images. `ds`: the whole dataset (a file read into memory), or None with
    `fh` the open file: only its header is read here, and the pixels frame by frame as they are decoded.

    Multi-frame files in 2D are decoded one frame at a time (pipeline/ingest/dicom_frames.py), so that a
    worker's memory does not grow with the number of frames; single frames and 3D volumes whole."""
    from pipeline.ingest.dicom_frames import unit_frames
    from pipeline.ingest.dicom_read import check_image_object, check_sop_class, decode_frames, read_dataset

    dims, voi, window = int(prep["spatial_dims"]), prep["voi"], prep.get("window")
    head = ds if ds is not None else read_dataset(fh, header_only=True)  # type: ignore[arg-type]
    check_sop_class(head)  # a DICOMDIR or a non-image object, before asking it for image attributes
    facts = _dicom_facts(head)
    if ds is not None:
        check_image_object(ds)  # (a file read from fh: its pixel data is looked for as frames are read)
    check_size(int(facts["rows"]), int(facts["cols"]), prep)
    f = int(facts["frames"])
    if dims == 2 and f > 1:
        if prep["multiframe"] == "volume":
            raise Rejected(
                R.WRONG_DIMENSIONALITY, f"multi-frame ({f} frames) kept as a volume needs spatial_dims 3"
            )
        first = prep["multiframe"] == "first"
        uf = unit_frames(head, fh, voi, window, [0] if first else None)
        shape = [f, int(facts["rows"]), int(facts["cols"])] + ([] if uf.grey else [3])
        facts.update(voi_rule=uf.rule, source_format="dicom", orig_shape=shape)
        out: list[Item] = []
        flat, low = 0, float("inf")
        for i, y in uf.frames:  # (C, H, W) in [0, 1], one frame at a time
            if is_constant(y):  # a constant frame of a multi-frame file: dropped, counted in the report
                flat, low = flat + 1, min(low, float(np.min(y)) if y.size else 0.0)
                continue
            out.append((finish_2d(y, prep), dict(facts, frame=-1 if first else i)))
        if not out:
            raise Rejected(R.CONSTANT_IMAGE, _constant_detail(np.array([low]), uf.rule))
        out[0][1]["constant_frames"] = flat
        return out
    if ds is None:
        ds = read_dataset(fh)  # type: ignore[arg-type]
        check_image_object(ds)
    frames, rule = decode_frames(ds, voi, window)  # (F, C, H, W) in [0, 1]
    f = frames.shape[0]
    shape = [f] if f > 1 else []
    shape += [int(facts["rows"]), int(facts["cols"])] + ([3] if frames.shape[1] == 3 else [])
    facts.update(voi_rule=rule, source_format="dicom", orig_shape=shape)
    if dims == 2:
        if is_constant(frames[0]):
            raise Rejected(R.CONSTANT_IMAGE, _constant_detail(frames, rule))
        return [(finish_2d(frames[0], prep), dict(facts, frame=-1, constant_frames=0))]
    if f == 1:
        raise Rejected(
            R.WRONG_DIMENSIONALITY,
            "a single-frame slice; 3D ingest groups slices by series (pass the folder)",
        )
    vol = frames.transpose(1, 0, 2, 3)  # (C, D, H, W)
    if is_constant(vol):
        raise Rejected(R.CONSTANT_IMAGE, _constant_detail(vol, rule))
    sp = facts["spacing"] or (1.0, 1.0)
    dz = facts["_ds_spacing_between"] or facts["slice_thickness"] or 1.0
    return [(finish_3d(vol, (float(dz), float(sp[0]), float(sp[1])), prep), dict(facts, frame=-1))]


def _constant_detail(x: np.ndarray, rule: str) -> str:
    v = float(np.min(x)) if x.size else 0.0
    return f"every pixel is {v:.3g} after the intensity window ({rule}): the image shows nothing"


def decode_series(files: list[tuple[Path, bytes]], prep: dict[str, Any]) -> Item:
    """Slices of one series -> (C, D, H, W) volume ordered along the slice normal, resampled with MONAI.

    Order: position projected on the normal n = row_dir x col_dir (ImagePositionPatient . n), which is
    correct for any orientation, unlike sorting on InstanceNumber or z. Gaps deviating more than
    `gap_tolerance` from the median are "uneven": rejected, or linearly interpolated onto the median step.
    """
    from pipeline.ingest.dicom_read import modality_frames, read_dataset, to_unit

    slices = []
    for _, data in files:
        ds = read_dataset(data)
        facts = _dicom_facts(ds)
        x, grey = modality_frames(ds)
        if not grey or x.shape[0] != 1:
            raise Rejected(R.INCONSISTENT_SERIES, "series mixes colour or multi-frame objects with slices")
        slices.append((ds, facts, x[0]))
    if len(slices) < 2:
        raise Rejected(R.INCONSISTENT_SERIES, "a series needs at least 2 slices for a 3D volume")
    f0 = slices[0][1]
    check_size(int(f0["rows"]), int(f0["cols"]), prep)
    ori = f0["_orientation"]
    if ori is None or any(s[1]["_position"] is None for s in slices):
        raise Rejected(R.INCONSISTENT_SERIES, "slices lack ImagePositionPatient/ImageOrientationPatient")
    for _, f, _ in slices:
        if (f["rows"], f["cols"]) != (f0["rows"], f0["cols"]):
            raise Rejected(
                R.INCONSISTENT_SERIES,
                f"slice sizes differ ({f0['rows']}x{f0['cols']} vs {f['rows']}x{f['cols']})",
            )
        if f["_orientation"] is None or np.abs(np.subtract(f["_orientation"], ori)).max() > 1e-3:
            raise Rejected(R.INCONSISTENT_SERIES, "slices have different orientations")
    normal = np.cross(np.asarray(ori[:3]), np.asarray(ori[3:]))
    dist = np.array([float(np.dot(f["_position"], normal)) for _, f, _ in slices])
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    gaps = np.diff(dist)
    if np.any(gaps < 1e-4):
        raise Rejected(
            R.INCONSISTENT_SERIES, "two slices share one position (duplicate or mixed acquisitions)"
        )
    med = float(np.median(gaps))
    dev = float(np.max(np.abs(gaps - med)) / med)
    stack = np.stack([slices[i][2] for i in order])  # (D, H, W) modality values
    uneven = dev > float(prep["gap_tolerance"])
    if uneven:
        if prep["uneven_series"] == "reject":
            raise Rejected(
                R.INCONSISTENT_SERIES,
                f"uneven slice gaps: max deviation {dev:.0%} of the median {med:.3g} mm",
            )
        # resample onto a regular grid with the median step: linear interpolation between neighbours
        n = int(round((dist[-1] - dist[0]) / med)) + 1
        grid = dist[0] + med * np.arange(n)
        hi = np.clip(np.searchsorted(dist, grid, side="right"), 1, len(dist) - 1)
        lo = hi - 1
        t = ((grid - dist[lo]) / (dist[hi] - dist[lo])).astype(np.float32)[:, None, None]
        stack = stack[lo] * (1 - t) + stack[hi] * t
    y, rule = to_unit(
        stack, slices[order[0]][0], prep["voi"], prep.get("window")
    )  # window over the whole volume
    if is_constant(y):
        raise Rejected(R.CONSTANT_IMAGE, _constant_detail(y, rule))
    sp = f0["spacing"] or (1.0, 1.0)
    arr = finish_3d(y[None], (med, float(sp[0]), float(sp[1])), prep)
    facts = dict(
        f0,
        voi_rule=rule,
        source_format="dicom_series",
        orig_shape=[len(slices), f0["rows"], f0["cols"]],
        spacing=(round(med, 4), float(sp[0]), float(sp[1])),
        n_slices=len(slices),
        uneven_gaps=bool(uneven),
        gap_deviation=round(dev, 4),
        frame=-1,
    )
    return arr, facts


# --------------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """The request: decode one file (kind "file"), the slices of one 3D series ("series"), or read one DICOM
    file's header ("header", to group slices into series: pipeline/ingest/series.py)."""

    kind: str  # "file" | "header" | "series"
    paths: list[str]
    rels: list[str]  # the paths relative to the scan root: only ever hashed (file_key)
    fmt: str
    prep: dict[str, Any]
    salt: bytes
    cache_dir: str | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """The outcome of one Task: its images and PHI-free facts, or the reason code it was rejected for."""

    ok: bool
    # PHI-free facts, one per stored image (header: one, with the slice's _position/_orientation added)
    items: list[dict[str, Any]] = field(default_factory=list)
    array: np.ndarray | None = None  # (k, C, ...) float16, the k stored images; None for a header
    cached: bool = False
    reason: str = ""  # a pipeline.ingest.reasons code when not ok
    detail: str = ""
    # warning codes (warning_codes) of a rejected task or a header read; a decode keeps them in items[0]
    warnings: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def rejected(reason: str, detail: str) -> TaskResult:
        return TaskResult(ok=False, reason=reason, detail=detail)


def _public(facts: dict[str, Any], salt: bytes, rel: str) -> dict[str, Any]:
    """Hash identifiers, drop everything starting with '_' (clear UIDs, positions): PHI-free facts."""
    out = {k: v for k, v in facts.items() if not k.startswith("_")}
    sop, study, series, pid = (
        facts.get(k) or "" for k in ("_sop_uid", "_study_uid", "_series_uid", "_patient_id")
    )
    out["sop_key"] = salted_key(salt, "sop", sop) if sop else ""
    out["study_key"] = salted_key(salt, "study", study) if study else ""
    out["series_key"] = salted_key(salt, "series", series) if series else ""
    out["patient_key"] = salted_key(salt, "patient", pid) if pid else ""
    out["file_key"] = salted_key(salt, "file", rel)
    for k in ("spacing",):
        if out.get(k) is not None:
            out[k] = [round(float(v), 5) for v in out[k]]
    return out


def _cache_path(task: Task, digests: list[str]) -> Path | None:
    if not task.cache_dir:
        return None
    h = hashlib.sha256()
    for part in (task.kind, task.fmt, prep_digest(task.prep), salt_id(task.salt), *task.rels, *digests):
        h.update(part.encode() + b"\x00")
    k = h.hexdigest()[:40]
    return Path(task.cache_dir) / k[:2] / f"{k}.fsc"


# cache entry: one line of JSON (PHI-free facts) then an np.save'd array ("-" when none). One file, no zip:
# a zip container (np.savez) cost more than the decode it saves for small images.
_MAGIC = b"fewscan-decode-1\n"


def _cache_load(p: Path | None) -> tuple[np.ndarray | None, list[dict[str, Any]]] | None:
    if p is None:
        return None
    try:
        blob = p.read_bytes()
    except OSError:
        return None
    try:
        if not blob.startswith(_MAGIC):
            return None
        nl = blob.index(b"\n", len(_MAGIC))
        meta = json.loads(blob[len(_MAGIC) : nl])
        rest = blob[nl + 1 :]
        x = None if rest == b"-" else np.load(io.BytesIO(rest), allow_pickle=False)
        return x, meta
    except (ValueError, OSError, EOFError):  # a corrupt entry is just a miss
        return None


def _cache_save(p: Path | None, x: np.ndarray | None, meta: list[dict[str, Any]]) -> None:
    if p is None:
        return
    # durable=False: a lost entry is a cache miss, and an fsync per decoded file would cost more than
    # many decodes; the rename still keeps a concurrent reader from seeing half an entry
    with atomic_open(p, "wb", durable=False) as f:
        f.write(_MAGIC + json.dumps(meta, separators=(",", ":")).encode() + b"\n")
        if x is None:
            f.write(b"-")
        else:
            np.save(f, x, allow_pickle=False)


# pydicom's warnings quote the offending value (a UID, a patient id): they never reach the terminal, only
# their code does, in the report (docs/ingest.md, "Warnings"). First match wins; {0} = the VR.
_WARNING_CODES = [
    (re.compile(r"^" + re.escape(R.NOTE) + r"(\w+)"), "{0}"),
    (re.compile(r"^Invalid value for VR (\w+)"), "invalid_value_{0}"),
    (re.compile(r"exceeds the maximum length of \d+ allowed for VR (\w+)"), "value_too_long_{0}"),
    (re.compile(r"[Ee]xpected (explicit|implicit) VR, but found"), "vr_mismatch"),
    (re.compile(r"Unknown DICOM tag"), "unknown_tag"),
    (re.compile(r"Number of Frames"), "invalid_number_of_frames"),
    (re.compile(r"[Pp]ixel [Dd]ata|excess padding|bytes long"), "pixel_data_length"),
]


def warning_codes(caught: list[warnings.WarningMessage]) -> dict[str, int]:
    """Captured warnings -> {code: count}; the messages themselves (which may hold PHI) are dropped."""
    out: Counter[str] = Counter()
    for w in caught:
        text = str(w.message)
        for pattern, code in _WARNING_CODES:
            m = pattern.search(text)
            if m:
                out[code.format(*m.groups()) if m.groups() else code] += 1
                break
        else:
            origin = "pydicom" if "pydicom" in str(w.filename) else "other"
            out[f"{origin}_warning"] += 1
    return dict(sorted(out.items()))


# A DICOM file larger than this is hashed in pieces and decoded from disk frame by frame, never held
# whole in a worker's memory (pipeline/ingest/dicom_frames.py); smaller files are read in one go, the
# fastest way for the many small files of a typical archive.
STREAM_BYTES = 16 * 2**20


def _load(path: Path, task: Task) -> tuple[bytes | None, str]:
    """(the file's bytes, or None for a large DICOM file decoded from disk; its SHA-256 for the cache)."""
    if task.kind == "file" and task.fmt == "dicom" and path.stat().st_size > STREAM_BYTES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return None, h.hexdigest()
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def run_task(task: Task) -> TaskResult:
    """Never raises for bad input: returns a TaskResult with ok False and the reason instead. Warnings
    raised while decoding are returned as codes (`warnings`), never printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _run_task(task, caught)
    if not res.ok or task.kind == "header":
        res.warnings = warning_codes(caught)
    return res


def _run_task(task: Task, caught: list[warnings.WarningMessage]) -> TaskResult:
    try:
        loaded = [_load(Path(p), task) for p in task.paths] if task.kind != "header" else []
    except OSError as e:
        return TaskResult.rejected(R.UNREADABLE, f"cannot read file ({type(e).__name__})")
    datas = [d for d, _ in loaded]
    try:
        if task.kind == "header":
            from pipeline.ingest.dicom_read import check_image_object, read_dataset

            p = Path(task.paths[0])
            with open(p, "rb") as fh:
                ds = read_dataset(fh.read(), header_only=True)
            check_image_object(ds, header_only=True)  # pixels are not read yet: the SOP class decides
            facts = _dicom_facts(ds)
            pub = _public(facts, task.salt, task.rels[0])
            pub["_position"], pub["_orientation"] = facts["_position"], facts["_orientation"]
            return TaskResult(ok=True, items=[pub])
        digests = [h for _, h in loaded]
        cp = _cache_path(task, digests)
        hit = _cache_load(cp)
        if hit is not None:
            return TaskResult(ok=True, items=hit[1], array=hit[0], cached=True)
        if task.kind == "series":
            arr, facts = decode_series(
                [(Path(p), d) for p, d in zip(task.paths, datas) if d is not None], task.prep
            )
            items = [_public(facts, task.salt, task.rels[0])]
            x: np.ndarray | None = arr[None]
        else:
            decoded = decode_file(Path(task.paths[0]), task.fmt, datas[0], task.prep)
            items = [_public(f, task.salt, task.rels[0]) for _, f in decoded]
            x = np.stack([a for a, _ in decoded]) if decoded else None
        if x is None:
            raise Rejected(R.NO_PIXEL_DATA, "the file holds no images")
        codes = warning_codes(caught)
        if codes:  # kept with the decode, so that a cache hit reports them too
            items[0]["warnings"] = codes
        _cache_save(cp, x, items)
        return TaskResult(ok=True, items=items, array=x)
    except Rejected as r:
        return TaskResult.rejected(r.reason, r.detail)
    except MemoryError:
        return TaskResult.rejected(R.UNREADABLE, "image too large to decode in memory")
    except Exception as e:  # one bad file never stops the ingest; the type names the bug for a report
        return TaskResult.rejected(R.UNREADABLE, f"unexpected {type(e).__name__} while decoding")
