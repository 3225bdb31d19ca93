"""The ingest stage: a data manifest -> de-identified scan index + image store, as an MLflow run.

Thin by design: the work is `pipeline.ingest.build.build_store`; this module logs PHI-free counts, the
index as a dataset input, and returns the one-line summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, TrackingError
from pipeline.ingest.build import IngestSummary, build_store
from pipeline.ingest.discover import discover
from pipeline.ingest.manifest import IngestConfig

# the command-line hooks live in options.py (no torch: the CLI validates before importing it)
from pipeline.ingest.options import add_arguments as add_arguments
from pipeline.ingest.options import overrides_from_args as overrides_from_args
from pipeline.names import metric_key
from pipeline.progress import log
from pipeline.protocols import RunLike
from pipeline.tracking import StageResult, UpstreamRun

CONFIG = IngestConfig


def run_name(cfg: IngestConfig) -> str:
    p = cfg.preprocess
    return f"ingest {cfg.name} {p.spatial_dims}D {'x'.join(map(str, p.image_size))}"


def fingerprint_inputs(cfg: IngestConfig) -> str:
    """The scan files and label table as they are now (relative path, size, mtime): when a researcher adds
    or replaces files, the chain re-ingests instead of reusing an old run. Only a digest leaves here."""
    h = hashlib.sha256()
    root = Path(cfg.scans.root)
    if root.is_dir():
        # the files ingest would walk (symbolic links followed, loops cut: discover.py)
        for c in discover(root, sniff_files=False):
            try:
                st = os.stat(c.path)
            except OSError:
                h.update(f"{c.rel}\0{c.reason}\n".encode())
                continue
            h.update(f"{c.rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if cfg.labels.path is not None and Path(cfg.labels.path).is_file():
        h.update(hashlib.sha256(Path(cfg.labels.path).read_bytes()).digest())
    return h.hexdigest()[:16]


# Operational knobs that do not change what ingest produces: changing them must not force a re-ingest.
FINGERPRINT_EXCLUDE = ("workers", "cache_dir", "local_report_dir", "kept_dir")


def public_config(cfg: IngestConfig) -> dict:
    """The manifest as logged to MLflow: folder and file paths replaced by salted hashes.

    A researcher's folder names can hold patient names (exports named after the patient are common), so
    no path reaches MLflow in clear; the local-only report next to the salt maps hashes back to paths.
    """
    from pipeline.ingest.deid import load_or_create_salt, salted_key

    salt = load_or_create_salt(cfg.salt_file)
    data = cfg.model_dump(mode="json")

    def hide(v: object) -> object:
        return None if v is None else "path:" + salted_key(salt, "config-path", str(Path(str(v)).resolve()))

    data["scans"]["root"] = hide(data["scans"].get("root"))
    if data["labels"].get("path") is not None:
        data["labels"]["path"] = hide(data["labels"]["path"])
    for key in ("salt_file", "cache_dir", "local_report_dir", "kept_dir"):
        data[key] = hide(data.get(key))
    return data


def execute(cfg: IngestConfig, run: RunLike, upstream: dict[str, UpstreamRun]) -> StageResult:
    try:
        s = build_store(cfg, run.outdir)
    except DataError:
        # nothing usable: the report says why file by file; upload it (a failed run uploads nothing else)
        report = run.outdir / "ingest_report.json"
        if report.is_file():
            with contextlib.suppress(Exception):
                run.log_artifact(report)
        raise
    try:
        _log_run(cfg, run, s)
        # Upload here rather than after the stage returns, so that a failed upload is caught below and
        # the decoded store is kept instead of being deleted with the run's temporary folder.
        for name in ("store", "ingest_report.json"):
            run.log_artifact(run.outdir / name, name if name == "store" else None)
    except BaseException as err:
        kept = keep_outputs(cfg, run)
        # the clear path goes to the terminal only; the error (which MLflow records) names no path
        log(f"ingest: recording in MLflow failed; the finished store and report are kept at {kept}")
        if isinstance(err, KeyboardInterrupt):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        cache = (
            "the decodes come from the decode cache"
            if cfg.cache_dir
            else "the decode cache is off (cache_dir: null), so files are decoded again"
        )
        raise TrackingError(
            f"ingest '{cfg.name}' decoded {s.n_images} images, but recording them in MLflow failed "
            f"({type(err).__name__}: {first}). Nothing decoded is lost: store/ and ingest_report.json are "
            f"kept in kept_dir, folder {kept.name} (local only, never uploaded; the path is printed above; "
            f"ImageStore.open reads it). Fix the cause and re-run the ingest: {cache}."
        ) from err
    for name in ("store", "ingest_report.json"):  # uploaded: the stage run has nothing left to upload
        p = run.outdir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return StageResult(
        summary=s.line(), metrics={"n_images": float(s.n_images), "n_patients": float(s.n_patients)}
    )


def keep_outputs(cfg: IngestConfig, run: RunLike) -> Path:
    """Move what the ingest wrote (store/, ingest_report.json) out of the run's temporary folder, which
    is deleted when the run fails, into `<kept_dir>/ingest-<name>-<run id>/` (docs/ingest.md)."""
    dest = Path(cfg.kept_dir) / f"ingest-{cfg.name}-{run.run_id}"
    # owner only, like the local reports: it is the researcher's local copy (docs/ARCHITECTURE.md principle 10)
    Path(cfg.kept_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    dest.mkdir(exist_ok=True, mode=0o700)
    dest.chmod(0o700)
    for name in ("store", "ingest_report.json"):
        src = run.outdir / name
        if src.exists():
            if (dest / name).exists():
                shutil.rmtree(dest / name) if (dest / name).is_dir() else (dest / name).unlink()
            shutil.move(str(src), str(dest / name))
    return dest.resolve()


def _log_run(cfg: IngestConfig, run: RunLike, s: IngestSummary) -> None:
    prep = s.meta["preprocessing"]
    # PHI-free only: counts, choices and digests. No paths (folder names often hold patient names/ids).
    params: dict[str, Any] = {
        "manifest": cfg.name,
        "formats": ",".join(cfg.scans.formats),
        "labels.source": cfg.labels.source,
        "labels.join": cfg.labels.join,
        "labels.normal_label": cfg.labels.normal_label,
        "preprocess": {k: v for k, v in prep.items() if k not in ("dtype",)},
        "salt_id": s.meta["salt_id"],
        "index_digest": s.digest,
        "n_label_names": len(s.meta["label_names"]),
    }
    run.log_params(params)
    # condition names enter keys only through pipeline/names.py (the parts were mapped in build_store)
    metrics: dict[str, float] = {
        "n_files": s.n_files,
        "n_images": s.n_images,
        "n_patients": s.n_patients,
        "n_rejected_files": s.n_rejected_files,
        "n_cached_decodes": s.cached,
        "decode_seconds": s.seconds,
        **{metric_key("rejected", k): v for k, v in s.reasons.items()},
        **{metric_key("label_images", s.label_keys[k]): v for k, v in s.label_counts.items()},
    }
    run.log_metrics(metrics)
    with warnings.catch_warnings():
        # mlflow hints that int columns cannot hold missing values: store_index/frame never miss
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        run.log_dataset(
            s.index,
            name=f"{cfg.name}-scan-index",
            digest=s.digest,
            context="ingest",
            source="store/scan_index.parquet",
        )
