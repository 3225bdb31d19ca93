"""The ingest library entry point: manifest -> image store + scan index + reports (no MLflow here).

Flow: discover files by content -> decode in parallel worker processes (each file, or each 3D series,
is one task; the decode cache makes re-ingest cheap) -> join labels -> stream accepted images into the
store -> commit atomically. Every file ends up in the report as accepted or rejected with a reason.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from pipeline.cpus import available_cpus, torch_threads
from pipeline.errors import ConfigError, DataError
from pipeline.ingest import reasons as R
from pipeline.ingest.deid import load_or_create_salt, salt_id, salted_key
from pipeline.ingest.discover import Candidate, discover
from pipeline.ingest.duplicates import SopLedger
from pipeline.ingest.labels import LabelTable, check_folder_labels, folder_label, load_table
from pipeline.ingest.manifest import IngestConfig
from pipeline.ingest.preprocess import PREPROCESS_VERSION
from pipeline.ingest.reading import DicomHeader, group_series, header_task
from pipeline.ingest.reasons import Rejected
from pipeline.ingest.store import StoreWriter, atomic_write_json
from pipeline.ingest.worker import Task, TaskResult, run_task
from pipeline.names import key_parts
from pipeline.progress import log, progress

# below this many tasks, starting worker processes costs more than it saves
MIN_PARALLEL_TASKS = 48

INDEX_COLUMNS = [
    "scan_key",
    "patient_key",
    "study_key",
    "series_key",
    "labels",
    "modality",
    "manufacturer",
    "photometric",
    "orig_shape",
    "spacing",
    "store_index",
    "source_format",
    "frame",
    "voi_rule",
    "age_bin",
    "sex",
    "file_key",
    "npz_split",
]


@dataclass
class IngestSummary:
    n_files: int
    n_images: int
    n_patients: int
    n_rejected_files: int
    reasons: dict[str, int]
    label_counts: dict[str, int]
    cached: int
    seconds: float
    digest: str
    index: pd.DataFrame
    meta: dict[str, Any]
    report: dict[str, Any] = field(repr=False, default_factory=dict)
    # condition name -> its part of MLflow keys (pipeline/names.py), e.g. label_images.<part>
    label_keys: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())) or "none"
        return (
            f"ingested {self.n_images} images of {self.n_patients} patients from {self.n_files} files "
            f"({self.cached} from cache) in {self.seconds:.1f}s; rejected: {rej}"
        )


def preprocessing_dict(cfg: IngestConfig) -> dict[str, Any]:
    """Everything `load_for_model` needs to reproduce the stored array of one new file."""
    prep = cfg.preprocess.model_dump(mode="json")
    prep["version"] = PREPROCESS_VERSION
    prep["dtype"] = "float16"
    return prep


def _worker_prep(cfg: IngestConfig) -> dict[str, Any]:
    prep = preprocessing_dict(cfg)
    prep["_label_names"] = list(cfg.labels.names or [])
    prep["_npz_splits"] = list(cfg.labels.npz_splits)
    return prep


def _mp_context() -> Any:
    """fork when this process runs a single thread (fast: workers inherit the imported decoders);
    otherwise forkserver, because forking a process with live threads (an MLflow client, a metrics
    monitor) can deadlock the child on a lock some thread held at fork time."""
    import threading

    methods = mp.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        import PIL.Image  # noqa: F401  (imported once here, shared by every forked worker)

        import pipeline.ingest.dicom_read  # noqa: F401

        return mp.get_context("fork")
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["pipeline.ingest.worker", "pipeline.ingest.dicom_read", "PIL.Image"])
    return ctx


def _pool_map(tasks: list[Task], workers: int, desc: str) -> Iterator[TaskResult]:
    """Results in task order; decoding spread over `workers` processes (1 = in this process)."""
    if workers <= 1 or len(tasks) < MIN_PARALLEL_TASKS:
        # Decoding in this process sets torch to one thread (preprocess.py); the caller's setting comes back.
        with torch_threads(1):
            yield from progress(map(run_task, tasks), total=len(tasks), desc=desc)
        return
    ctx = _mp_context()
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    with ctx.Pool(workers) as pool:
        try:
            yield from progress(pool.imap(run_task, tasks, chunksize=chunk), total=len(tasks), desc=desc)
        except BaseException:
            pool.terminate()
            raise


def _digest(index: pd.DataFrame) -> str:
    h = hashlib.sha256(pd.util.hash_pandas_object(index, index=False).values.tobytes())
    return h.hexdigest()[:16]


def build_store(cfg: IngestConfig, outdir: Path, workers: int | None = None) -> IngestSummary:
    """Ingest per `cfg` into `outdir/store/` and `outdir/ingest_report.json`. Raises DataError when nothing
    usable was found (the report is still written, so the reasons can be read)."""
    t0 = time.monotonic()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    salt = load_or_create_salt(cfg.salt_file)
    # one decode process per CPU this process may use (affinity, cgroup quota; each runs torch single-threaded)
    nproc = workers if workers is not None else (cfg.workers or available_cpus())
    lab = cfg.labels
    clash = [c for c in lab.group_columns if c in INDEX_COLUMNS]
    if clash:
        raise ConfigError(
            f"labels.group_columns {clash} would replace column(s) of the scan index; rename them in the label "
            f"file (the index has {', '.join(INDEX_COLUMNS)})"
        )
    table: LabelTable | None = load_table(lab, salt) if lab.source == "csv" else None
    skip = {Path(lab.path)} if lab.path else set()
    cands = discover(cfg.scans.root, cfg.scans.exclude, skip)
    if lab.source == "folders":
        check_folder_labels([c.rel for c in cands])
    if not cands:
        raise DataError(f"no files under scan root {cfg.scans.root} (check scans.root and scans.exclude)")
    prep = _worker_prep(cfg)
    dims = cfg.preprocess.spatial_dims
    cache = str(cfg.cache_dir) if cfg.cache_dir else None

    files: dict[str, dict[str, Any]] = {}  # rel -> report entry (rel stays local)

    def reject(rel: str, fmt: str, reason: str, detail: str) -> None:
        files[rel] = {
            "file_key": salted_key(salt, "file", rel),
            "format": fmt,
            "status": "rejected",
            "reason": reason,
            "detail": detail,
        }

    # warning codes per file (worker.warning_codes: pydicom's messages never reach the terminal)
    warns: dict[str, Counter[str]] = {}

    def add_warnings(rel: str, codes: dict[str, int] | None) -> None:
        if codes:
            warns.setdefault(rel, Counter()).update(codes)

    usable: list[Candidate] = []
    for c in cands:
        if c.reason:  # found while walking the folders (a broken symbolic link)
            reject(c.rel, c.fmt, c.reason, c.detail)
        elif c.fmt == "unknown":
            reject(c.rel, c.fmt, R.UNREADABLE, "not a DICOM, NIfTI, PNG, JPEG or npz file")
        elif c.fmt not in cfg.scans.formats:
            reject(
                c.rel, c.fmt, R.FORMAT_NOT_SELECTED, f"{c.fmt} is not in scans.formats {cfg.scans.formats}"
            )
        else:
            usable.append(c)

    def mk(kind: str, cs: list[Candidate]) -> Task:
        return Task(kind, [str(c.path) for c in cs], [c.rel for c in cs], cs[0].fmt, prep, salt, cache)

    tasks: list[Task] = []
    if dims == 3:
        # pass 1: headers of DICOM files, to group single-frame slices into series (the grouping adapt
        # and predict use too: pipeline/ingest/reading.py)
        dcm = [c for c in usable if c.fmt == "dicom"]
        heads = [
            DicomHeader.from_result(res)
            for res in _pool_map(
                [header_task(c.path, c.rel, prep, salt) for c in dcm], nproc, "ingest: reading DICOM headers"
            )
        ]
        for c, head in zip(dcm, heads):
            add_warnings(c.rel, head.warnings)
        groups = group_series(dcm, heads)
        for _, c, head in groups.unreadable:
            reject(c.rel, c.fmt, head.reason, head.detail)
        for _, c in groups.no_series:
            reject(c.rel, c.fmt, R.INCONSISTENT_SERIES, "slice without SeriesInstanceUID")
        for c, kept in groups.duplicates:
            first = salted_key(salt, "file", kept.rel)
            reject(
                c.rel,
                c.fmt,
                R.DUPLICATE_SOP,
                f"same SOP Instance UID as slice {first} of this series, which is kept",
            )
        # multi-frame files in header order, then the series by key, then the other formats: the order of
        # the store's rows
        tasks += [mk("file", u.files) for u in groups.units if not u.series_key]
        series = sorted((u for u in groups.units if u.series_key), key=lambda u: u.series_key)
        tasks += [mk("series", u.files) for u in series]
        tasks += [mk("file", [c]) for c in usable if c.fmt != "dicom"]
    else:
        tasks = [mk("file", [c]) for c in usable]

    store_dir = outdir / "store"
    item_shape = (cfg.preprocess.channels, *cfg.preprocess.image_size)
    writer = StoreWriter(store_dir, item_shape)
    rows: list[dict[str, Any]] = []
    seen_scans: set[str] = set()
    sops = SopLedger(salt)
    cached = 0
    try:
        for task, res in zip(tasks, _pool_map(tasks, nproc, f"ingest {cfg.name}: decoding")):
            rel0 = task.rels[0]
            add_warnings(rel0, res.warnings or (res.items[0].get("warnings") if res.ok else None))
            if not res.ok:
                for rel in task.rels:
                    reject(rel, task.fmt, res.reason, res.detail)
                continue
            try:  # one file per SOP instance, whatever form each copy has (pipeline/ingest/duplicates.py)
                sops.check(task.kind, res.items, rel0)
            except Rejected as dup:
                reject(rel0, task.fmt, dup.reason, dup.detail)
                continue
            cached += int(res.cached)
            arr = res.array  # (k, C, ...) float16
            assert arr is not None  # an ok decode holds its images (worker._run_task)
            keep_rows, accepted = [], 0
            notes: Counter[str] = Counter()
            why_excluded = ""
            for j, it in enumerate(res.items):
                if task.kind == "series":
                    scan_key = it["series_key"]
                elif it.get("source_format") == "npz":
                    scan_key = salted_key(
                        salt, "npz", f"{it['file_key']}#{it['npz_split']}#{it['npz_index']}"
                    )
                elif it.get("sop_key"):
                    scan_key = (
                        it["sop_key"]
                        if it.get("frame", -1) < 0
                        else salted_key(salt, "frame", f"{it['sop_key']}#{it['frame']}")
                    )
                else:
                    scan_key = (
                        it["file_key"]
                        if it.get("frame", -1) < 0
                        else salted_key(salt, "frame", f"{it['file_key']}#{it['frame']}")
                    )
                if scan_key in seen_scans:
                    notes[R.DUPLICATE_SOP] += 1
                    continue
                # labels
                row = None
                if lab.source == "csv":
                    assert table is not None
                    # a 3D series is labelled by the folder that holds its slices (its name, or its path)
                    row = table.lookup(_series_folder(task.rels) if task.kind == "series" else rel0, it)
                    labels = row.labels if row else []
                    if row is not None and row.excluded:  # labels.uncertain / labels.blank: exclude
                        notes[R.LABEL_EXCLUDED] += 1
                        why_excluded = row.excluded
                        continue
                elif lab.source == "folders":
                    fl = folder_label(rel0)
                    labels = [fl] if fl else []
                elif lab.source == "npz":
                    labels = list(it.get("labels") or [])
                    labels = labels or [lab.normal_label]  # MedMNIST multi-label all-zero row = no finding
                else:  # source none: scans without labels (docs/ingest.md, "Scans without labels")
                    labels = []
                if not labels and lab.source != "none":
                    notes[R.NO_LABEL] += 1
                    continue
                seen_scans.add(scan_key)
                patient = (
                    (row.patient_key if row else "")
                    or it.get("patient_key")
                    or it.get("study_key")
                    or scan_key
                )
                keep_rows.append(j)
                rows.append(
                    {
                        "scan_key": scan_key,
                        "patient_key": patient,
                        "study_key": it.get("study_key") or scan_key,
                        "series_key": it.get("series_key", ""),
                        "labels": "|".join(sorted(labels)),
                        "modality": it.get("modality", ""),
                        "manufacturer": it.get("manufacturer", ""),
                        "photometric": it.get("photometric", ""),
                        "orig_shape": "x".join(str(s) for s in it.get("orig_shape", [])),
                        "spacing": "x".join(f"{s:g}" for s in (it.get("spacing") or [])),
                        "source_format": it.get("source_format", task.fmt),
                        "frame": int(it.get("frame", -1)),
                        "voi_rule": it.get("voi_rule", ""),
                        "age_bin": (row.age_bin if row and row.age_bin else it.get("age_bin", "")),
                        "sex": (row.sex if row and row.sex else it.get("sex", "")),
                        "file_key": it["file_key"],
                        "npz_split": it.get("npz_split", ""),
                        # labels.group_columns, verbatim (docs/ingest.md): what episodes.group_by reads
                        **{c: (row.groups.get(c, "") if row else "") for c in lab.group_columns},
                    }
                )
                accepted += 1
            if res.items and res.items[0].get("constant_frames"):  # multi-frame: blank frames dropped
                notes[R.CONSTANT_IMAGE] += int(res.items[0]["constant_frames"])
            if keep_rows:
                rng = writer.append(arr[keep_rows])
                for r, si in zip(rows[-len(keep_rows) :], rng):
                    r["store_index"] = si
            if accepted:
                sops.keep(task.kind, res.items, rel0)
            for rel in task.rels:
                if accepted:
                    files[rel] = {
                        # the worker hashed the first file's path already (worker._public)
                        "file_key": (rel == rel0 and res.items[0].get("file_key"))
                        or salted_key(salt, "file", rel),
                        "format": task.fmt,
                        "status": "accepted",
                        "images": accepted if rel == rel0 else 0,
                        "cached": bool(res.cached),
                    }
                    if notes:
                        files[rel]["dropped_images"] = dict(notes)
                else:
                    reason = next(iter(notes)) if notes else R.NO_PIXEL_DATA
                    detail = {
                        R.NO_LABEL: "no row of the label table matches this file"
                        if lab.source == "csv"
                        else "file lies directly under the scan root, outside any condition folder",
                        R.DUPLICATE_SOP: "same SOPInstanceUID as an earlier file",
                        R.LABEL_EXCLUDED: f"its label row is excluded by the manifest: {why_excluded}",
                    }.get(reason, "no image")
                    reject(rel, task.fmt, reason, detail)

        if table is not None and table.join in ("file_name", "relative_path"):
            # a row whose file exists but was rejected is not a "label for a missing file"
            for rel, f in files.items():
                if f["status"] == "rejected":
                    table.lookup(rel, {})
                    if dims == 3 and "/" in rel:  # a rejected slice: its series folder has the row
                        table.lookup(str(PurePosixPath(rel).parent), {})
        label_rows_missing = table.unused() if table is not None else []
        for rel, codes in warns.items():
            if rel in files:
                files[rel]["warnings"] = dict(sorted(codes.items()))
        warning_totals: Counter[str] = Counter()
        for codes in warns.values():
            warning_totals.update(codes)
        reasons = Counter(f["reason"] for f in files.values() if f["status"] == "rejected")
        if label_rows_missing:
            reasons[R.LABEL_FOR_MISSING_FILE] = len(label_rows_missing)
        n_acc_files = sum(1 for f in files.values() if f["status"] == "accepted")
        index = pd.DataFrame(rows, columns=INDEX_COLUMNS + list(lab.group_columns))
        if len(index):
            index["store_index"] = index["store_index"].astype("int64")
        label_counts: Counter[str] = Counter()
        for s in index["labels"]:
            label_counts.update(x for x in s.split("|") if x)  # "" = an unlabelled scan (source none)
        # MLflow key parts of the condition names, mapped once for the whole set (pipeline/names.py)
        label_keys = key_parts(label_counts)
        for w in label_keys.collisions:
            log(f"ingest: WARNING: {w}")
        report: dict[str, Any] = {
            "manifest": cfg.name,
            "salt_id": salt_id(salt),
            "n_files": len(files),
            "n_accepted_files": n_acc_files,
            "n_rejected_files": len(files) - n_acc_files,
            "n_images": len(index),
            "reasons": dict(sorted(reasons.items())),
            # what pydicom and the readers warned about, by code (docs/ingest.md, "Warnings"); per file too
            "warnings": dict(sorted(warning_totals.items())),
            "label_counts": dict(sorted(label_counts.items())),
            # condition names whose MLflow key differs from the name (label_images.<key>)
            "label_metric_keys": label_keys.changed(),
            "label_key_collisions": label_keys.collisions,
            # keys hashed (join keys of hashed joins are already salted; file names are hashed here)
            "label_rows_without_file": [salted_key(salt, "label_row", k) for k in label_rows_missing],
            "files": sorted(files.values(), key=lambda f: f["file_key"]),
            "note": "paths are salted hashes (file_key); the local report next to the salt maps them back to paths",
        }
        atomic_write_json(outdir / "ingest_report.json", report)
        _write_local_report(cfg, files, label_rows_missing)
        if len(index) == 0:
            top = ", ".join(f"{k} {v}" for k, v in reasons.most_common()) or "no candidate files"
            raise DataError(
                f"nothing usable in {len(files)} files under scans.root ({top}); see ingest_report.json and "
                f"check scans.root, scans.formats and the labels.join/key_column settings"
            )
        meta: dict[str, Any] = {
            "manifest": cfg.name,
            "spatial_dims": dims,
            "channels": cfg.preprocess.channels,
            "preprocessing": preprocessing_dict(cfg),
            "label_names": sorted(label_counts),
            "normal_label": lab.normal_label,
            "n_patients": int(index["patient_key"].nunique()),
            "salt_id": salt_id(salt),
            "index_digest": _digest(index),
        }
        writer.commit(index, meta)
    except BaseException:
        writer.abort()
        raise
    summary = IngestSummary(
        n_files=len(files),
        n_images=len(index),
        n_patients=meta["n_patients"],
        n_rejected_files=report["n_rejected_files"],
        reasons=dict(reasons),
        label_counts=dict(label_counts),
        cached=cached,
        seconds=time.monotonic() - t0,
        digest=meta["index_digest"],
        index=index,
        meta=meta,
        report=report,
        label_keys=dict(label_keys.parts),
    )
    log(summary.line())
    return summary


def _series_folder(rels: list[str]) -> str:
    parents = {str(PurePosixPath(r).parent) for r in rels}
    return parents.pop() if len(parents) == 1 else os.path.commonpath(list(parents))


def _write_local_report(cfg: IngestConfig, files: dict[str, dict[str, Any]], label_rows: list[str]) -> None:
    """Clear paths for the researcher, kept next to the salt (never uploaded): file_key -> path."""
    d = Path(cfg.local_report_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_json(
        d / f"{cfg.name}.paths.json",
        {
            "scan_root": str(cfg.scans.root),
            "files": {
                f["file_key"]: {"path": rel, **{k: v for k, v in f.items() if k != "file_key"}}
                for rel, f in sorted(files.items())
            },
            "label_rows_without_file": label_rows
            if cfg.labels.join in ("file_name", "relative_path")
            else [],
        },
        private=True,
    )
