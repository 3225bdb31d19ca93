"""The ingest stage: a data manifest -> de-identified scan index + image store, as an MLflow run.

Thin by design: the work is `pipeline.ingest.build.build_store`; this module logs PHI-free counts, the
index as a dataset input, and returns the one-line summary.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

from pipeline.ingest.build import build_store
from pipeline.ingest.manifest import IngestConfig
from pipeline.tracking import StageResult, StageRun, UpstreamRun

CONFIG = IngestConfig
UPSTREAM: tuple[str, ...] = ()


def run_name(cfg: IngestConfig) -> str:
    p = cfg.preprocess
    return f"ingest {cfg.name} {p.spatial_dims}D {'x'.join(map(str, p.image_size))}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    parser.add_argument(
        "--no-cache", action="store_true", help="decode every file again (ignore the local decode cache)"
    )


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "workers", None) is not None:
        out.append(f"workers={int(args.workers)}")
    if getattr(args, "no_cache", False):
        out.append("cache_dir=null")
    return out


def fingerprint_inputs(cfg: IngestConfig) -> str:
    """The scan files and label table as they are now (relative path, size, mtime): when a researcher adds
    or replaces files, the chain re-ingests instead of reusing an old run. Only a digest leaves here."""
    h = hashlib.sha256()
    root = Path(cfg.scans.root)
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                try:
                    st = os.stat(os.path.join(dirpath, fn))
                except OSError:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fn), root)
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if cfg.labels.path is not None and Path(cfg.labels.path).is_file():
        h.update(hashlib.sha256(Path(cfg.labels.path).read_bytes()).digest())
    return h.hexdigest()[:16]


# Operational knobs that do not change what ingest produces: changing them must not force a re-ingest.
FINGERPRINT_EXCLUDE = ("workers", "cache_dir", "local_report_dir")


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
    for key in ("salt_file", "cache_dir", "local_report_dir"):
        data[key] = hide(data.get(key))
    return data


def execute(cfg: IngestConfig, run: StageRun, upstream: dict[str, UpstreamRun]) -> StageResult:
    s = build_store(cfg, run.outdir)
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
    metrics: dict[str, float] = {
        "n_files": s.n_files,
        "n_images": s.n_images,
        "n_patients": s.n_patients,
        "n_rejected_files": s.n_rejected_files,
        "n_cached_decodes": s.cached,
        "decode_seconds": s.seconds,
        **{f"rejected.{k}": v for k, v in s.reasons.items()},
        **{f"label_images.{k.replace(' ', '_')}": v for k, v in s.label_counts.items()},
    }
    run.log_metrics(metrics)
    with warnings.catch_warnings():
        # mlflow hints that int columns cannot hold missing values: store_index/frame never miss
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*multiple ways", category=UserWarning)
        run.log_dataset(
            s.index,
            name=f"{cfg.name}-scan-index",
            digest=s.digest,
            context="ingest",
            source="store/scan_index.parquet",
        )
    return StageResult(
        summary=s.line(), metrics={"n_images": float(s.n_images), "n_patients": float(s.n_patients)}
    )
