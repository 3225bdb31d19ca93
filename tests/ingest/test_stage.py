"""The ingest stage through a real (temporary SQLite) MLflow store: contract outputs, and no PHI anywhere
in what the run wrote to MLflow (params, tags, metrics, dataset inputs, artifacts)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.ingest import stage
from pipeline.ingest.store import ImageStore
from tests.ingest.conftest import FAKE_NAME
from tests.ingest.helpers import FAKE_PIDS, FAKE_SUBJECT_DIRS, make_study, manifest


def test_stage_run_outputs_and_no_phi_in_mlflow(tmp_store: Path) -> None:
    from pipeline import tracking

    make_study(tmp_store / "study")
    cfg = manifest(Path("study"))  # relative: resolved against the working directory
    out = stages.execute_stage("ingest", cfg, upstream={}, suite=None, dataset=cfg.name)
    run = tracking.client().get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fewscan.stage"] == "ingest"
    assert run.data.metrics["n_images"] == 12 and run.data.metrics["rejected.unreadable"] == 2
    assert run.data.params["labels.join"] == "file_name"
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest and inputs[0].tags[0].value == "ingest"

    up = tracking.UpstreamRun.from_id(out.run_id, expect_stage="ingest")
    st = ImageStore.open(up.artifact("store"))
    assert st.images.shape == (12, 1, 16, 16) and len(st.index) == 12
    assert st.meta["preprocessing"]["image_size"] == [16, 16]
    assert up.read_json("ingest_report.json")["n_files"] == 14

    # everything MLflow holds for this run: the SQLite database and all artifact files
    blobs = [p.read_bytes() for p in (tmp_store / "mlflow").rglob("*") if p.is_file() and p.suffix != ".npy"]
    blob = b"\n".join(blobs)
    assert b"scan_index" in blob  # the grep does see the artifacts
    phi = [*FAKE_PIDS, *FAKE_SUBJECT_DIRS, FAKE_NAME, "Fakename", "FAKEACC42", "Fake General Hospital", "19000101",
           "00000003_000", "1.2.826.0.1.3680043"]  # fmt: skip
    leaked = [v for v in phi if v.encode() in blob]
    assert not leaked
    # the salt stays outside MLflow
    salt = Path(".fewscan/salt").read_text().strip().encode()
    assert salt not in blob


def test_stage_interface_and_cli_options() -> None:
    assert stage.CONFIG.__name__ == "IngestConfig"  # its upstream stages: pipeline/stage_configs.py
    cfg = manifest(Path("x"))
    assert stage.run_name(cfg) == "ingest tiny 2D 16x16"
    p = argparse.ArgumentParser()
    stage.add_arguments(p)
    args = p.parse_args(["--workers", "3", "--no-cache"])
    assert stage.overrides_from_args(args) == ["workers=3", "cache_dir=null"]


def test_fingerprint_inputs_follow_the_files(tmp_path: Path) -> None:
    make_study(tmp_path / "s")
    cfg = manifest(tmp_path / "s")
    a = stage.fingerprint_inputs(cfg)
    assert a == stage.fingerprint_inputs(cfg)
    (tmp_path / "s" / "dicom" / "new.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert stage.fingerprint_inputs(cfg) != a


def test_nothing_usable_fails_the_run_with_a_data_error(tmp_store: Path) -> None:
    from pipeline.errors import DataError

    (tmp_store / "empty" / "dicom").mkdir(parents=True)
    (tmp_store / "empty" / "dicom" / "x.txt").write_text("no scans")
    (tmp_store / "empty" / "labels.csv").write_text(
        "Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender\n"
    )
    cfg = manifest(Path("empty"))
    with pytest.raises(DataError, match="nothing usable"):
        stages.execute_stage("ingest", cfg, upstream={}, suite=None, dataset=cfg.name)
    from pipeline import tracking

    (run,) = tracking.client().search_runs([tracking.experiment_id("fewscan/dataset-tiny")])
    assert run.info.status == "FAILED" and "nothing usable" in run.data.tags["fewscan.error"]


@pytest.mark.parametrize("fail_at", ["log_metrics", "log_artifact"])
def test_a_failure_after_decoding_keeps_the_store_and_says_where(
    tmp_store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fail_at: str
) -> None:
    """Issue 14: logging or uploading fails after every file was decoded -> the store is kept, not lost."""
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.errors import TrackingError

    real = getattr(tracking.StageRun, fail_at)

    def boom(self: tracking.StageRun, what: object, *a: object, **k: object) -> None:
        if fail_at == "log_artifact" and Path(str(what)).name != "store":
            return real(self, what, *a, **k)  # the config YAML at the start of the run uploads fine
        raise MlflowException("Invalid value \"label_images.X\" for parameter 'metrics[0].name'\nmore lines")

    monkeypatch.setattr(tracking.StageRun, fail_at, boom)
    make_study(tmp_store / "study")
    cfg = manifest(Path("study"))
    with pytest.raises(TrackingError) as e:
        stages.execute_stage("ingest", cfg, upstream={}, suite=None, dataset=cfg.name)
    msg = str(e.value)
    assert "decoded 12 images" in msg and "MlflowException: Invalid value" in msg and "more lines" not in msg
    (kept,) = Path(".fewscan/kept").iterdir()
    assert kept.name in msg and str(tmp_store) not in msg  # the error (recorded by MLflow) names no path
    assert str(kept.resolve()) in capsys.readouterr().err  # the terminal gets the clear path
    st = ImageStore.open(kept / "store")
    assert st.images.shape == (12, 1, 16, 16)
    assert (kept / "ingest_report.json").is_file()
    (run,) = tracking.client().search_runs([tracking.experiment_id("fewscan/dataset-tiny")])
    assert run.info.status == "FAILED" and kept.name in run.data.tags["fewscan.error"]


def test_nothing_usable_still_uploads_the_report(tmp_store: Path) -> None:
    from pipeline import tracking
    from pipeline.errors import DataError

    (tmp_store / "e" / "dicom").mkdir(parents=True)
    (tmp_store / "e" / "dicom" / "x.txt").write_text("no scans")
    (tmp_store / "e" / "labels.csv").write_text(
        "Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender\n"
    )
    with pytest.raises(DataError):
        stages.execute_stage("ingest", manifest(Path("e")), upstream={}, suite=None, dataset="tiny")
    (run,) = tracking.client().search_runs([tracking.experiment_id("fewscan/dataset-tiny")])
    names = {a.path for a in tracking.client().list_artifacts(run.info.run_id)}
    assert "ingest_report.json" in names
