"""A run's artifacts as local paths: the run's own folder when the store is local, else a download cache
(FEWSCAN_CACHE, default .fewscan/cache/<run id>/) that several processes share, each artifact downloaded
once (docs/scaling.md; `fewscan gc` removes a deleted run's downloads: pipeline/gc_runs.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow.artifacts
from mlflow.exceptions import MlflowException

from pipeline.errors import UpstreamError
from pipeline.progress import log
from pipeline.tracking.store import retry, tracking_uri


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The run's artifact folder on this machine, or None if it lives behind a server."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_uri:
        return Path(artifact_uri)
    return None


def cache_root() -> Path:
    return Path(os.environ.get("FEWSCAN_CACHE", ".fewscan/cache")).resolve()


def download_cache(run_id: str) -> Path:
    """Where this machine keeps what it downloaded of run `run_id`'s artifacts (`artifact_path`)."""
    return cache_root() / run_id


def artifact_path(run_id: str, artifact_uri: str, rel: str) -> Path:
    local = local_artifact_dir(artifact_uri)
    if local is not None:
        p = local / rel
        if not p.exists():
            raise UpstreamError(f"run {run_id} has no artifact '{rel}' (looked in {local})")
        return p
    dest = download_cache(run_id)
    target = dest / rel
    # A cached folder is complete only if it was downloaded as that folder: fetching one file of it
    # (store/scan_index.parquet) creates the folder (store/) as well. A marker per downloaded folder says so.
    marker = dest / ".complete" / hashlib.sha256(rel.strip("/").encode()).hexdigest()[:24]
    if target.is_file() or (target.is_dir() and marker.exists()):
        return target
    dest.mkdir(parents=True, exist_ok=True)
    # One download however many processes ask at once (torchrun's ranks share this cache: docs/scaling.md):
    # the first to hold the run's lock downloads, the others wait for it and then find the artifact complete.
    lock = _lock(dest / ".download.lock")
    if target.is_file() or (target.is_dir() and marker.exists()):
        os.close(lock)
        return target
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".dl-"))
    try:
        got = retry(
            lambda: mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=rel, dst_path=str(tmp), tracking_uri=tracking_uri()
            ),
            f"download artifact {rel}",
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():  # a partial folder left by an earlier single-file download: replace it whole
            old = Path(tempfile.mkdtemp(dir=dest, prefix=".old-"))
            os.replace(target, old / "partial")
            shutil.rmtree(old, ignore_errors=True)
        # A rename of what MLflow finished downloading (one file, or a whole folder: not a file fewscan
        # writes, so not pipeline/atomic.py's job): it appears at once, never half-downloaded.
        os.replace(got, target)
        if target.is_dir():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    except MlflowException as err:
        raise UpstreamError(f"run {run_id} has no artifact '{rel}': {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)  # releases it
    return target


def _lock(path: Path) -> int:
    """An exclusive `flock` on `path` (created if missing), held until the returned descriptor is closed.
    On a file system without locks (an NFS mount without a lock service) it goes on unlocked, as before."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        log(f"artifact cache: no file lock in {path.parent} ({err.strerror}): processes may download twice")
    return fd
