"""An artifact behind a tracking server is downloaded once into the shared cache however many processes
(torchrun's ranks on one machine) ask for it at the same moment; the others wait and read the cached copy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .helpers import job_env

# Each process fakes MLflow's download (a store folder written slowly, each call counted in a shared file),
# waits for the common start signal, then asks for the artifact as meta-train's ranks ask for the store.
ASKER = """if True:
    import os, sys, time
    from pathlib import Path
    import mlflow.artifacts
    from pipeline import tracking

    root = Path(sys.argv[1])

    def fake_download(run_id, artifact_path, dst_path, tracking_uri=None):
        with open(root / "downloads.log", "a") as f:
            f.write(f"{os.getpid()} {artifact_path}\\n")
        out = Path(dst_path) / artifact_path
        out.mkdir(parents=True)
        (out / "images.npy").write_bytes(b"x" * 1000)
        time.sleep(1.5)  # a slow download: the other process asks while this one is under way
        (out / "scan_index.parquet").write_bytes(b"index")
        return str(out)

    mlflow.artifacts.download_artifacts = fake_download
    (root / f"ready-{os.getpid()}").touch()
    while not (root / "go").exists():
        time.sleep(0.01)
    p = tracking.UpstreamRun("r1", "ingest", {}, {}, "mlflow-artifacts:/1/r1/artifacts").artifact("store")
    print(p, sorted(q.name for q in p.iterdir()))
"""


def test_concurrent_processes_download_an_artifact_once_into_the_shared_cache(tmp_path: Path) -> None:
    env = job_env(FEWSCAN_CACHE=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ASKER, str(tmp_path)],
            cwd=tmp_path,  # not the repo root, whose local store folder `mlflow/` is no package
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # both have imported mlflow and wait for the signal: they ask at the same moment
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [o.strip().splitlines()[-1] for o in outs]
    expected = f"{tmp_path / 'cache' / 'r1' / 'store'} ['images.npy', 'scan_index.parquet']"
    assert lines == [expected, expected], outs
    downloads = (tmp_path / "downloads.log").read_text().splitlines()
    assert len(downloads) == 1 and downloads[0].endswith(" store"), downloads
    # nothing half-written is left beside the cached copy
    left = sorted(p.name for p in (tmp_path / "cache" / "r1").iterdir())
    assert left == [".complete", ".download.lock", "store"], left


def test_a_cache_on_a_file_system_without_locks_still_downloads(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno
    import fcntl

    import mlflow.artifacts

    from pipeline import tracking

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    def fake_download(run_id: str, artifact_path: str, dst_path: str, tracking_uri: str | None = None) -> str:
        out = Path(dst_path) / artifact_path
        out.mkdir(parents=True)
        (out / "images.npy").write_bytes(b"x")
        return str(out)

    monkeypatch.setenv("FEWSCAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", fake_download)
    run = tracking.UpstreamRun("r2", "ingest", {}, {}, "mlflow-artifacts:/1/r2/artifacts")
    assert sorted(p.name for p in run.artifact("store").iterdir()) == ["images.npy"]
    assert "no file lock" in capsys.readouterr().err
