"""The adapt stage as an MLflow run, and `predict` on its registered model (a real SQLite store)."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import stages, tracking
from pipeline.adapt.config import AdaptConfig
from pipeline.adapt.predict import predict
from pipeline.adapt.stage import choose_method
from pipeline.config import validate
from pipeline.errors import ConfigError, DataError, FewscanError, UpstreamError
from tests.adapt import helpers as h

SEEN = "SYN01003"  # a query patient that the meta-model's ingest also holds (a leak to report)


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, meta_model_dir: Path, sets: dict[str, Path]
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)
        mp.setattr(tracking, "_client", None)
        mp.setattr(tracking, "_client_uri", None)
        ids = h.make_upstream_runs(meta_model_dir, seen_patients=[SEEN])
        support = shutil.copytree(sets["support"], root / "data" / "support")
        (support / h.CONDITION / "broken.dcm").write_bytes(b"\x00" * 300)  # unreadable: reported, skipped
        cfg = validate(
            {"support": str(support), "query": str(sets["query"]), "condition": h.CONDITION},
            AdaptConfig,
            "test",
        )
        out = stages.execute_stage(
            "adapt",
            cfg,
            upstream={"meta-train": tracking.UpstreamRun.from_id(ids["meta-train"])},
            suite="adapttest",
            dataset="synthetic",
        )
        yield {"root": root, "ids": ids, "run_id": out.run_id, "summary": out.summary, "support": support}


def _run(run_id: str):
    return tracking.client().get_run(run_id)


def test_adapt_run_is_finished_linked_and_logs_the_support_loss_per_step(store: dict[str, Any]) -> None:
    run = _run(store["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["fewscan.stage"] == "adapt"
    assert run.data.tags["fewscan.upstream.meta-train"] == store["ids"]["meta-train"]
    hist = tracking.client().get_metric_history(store["run_id"], "support_loss")
    losses = [m.value for m in sorted(hist, key=lambda m: m.step)]
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(9))  # steps 0..8 (eval_steps)
    assert losses[-1] < 0.5 * losses[0]
    m = run.data.metrics
    assert m["support_scans"] == 10 and m["support_rejected"] == 1
    assert "1 unreadable skipped" in store["summary"]


def test_adaptation_improves_query_metrics_over_the_unadapted_model(store: dict[str, Any]) -> None:
    m = _run(store["run_id"]).data.metrics
    assert m["query_accuracy_unadapted"] == pytest.approx(0.5)
    assert m["query_accuracy"] >= 0.85 and m["query_accuracy"] > m["query_accuracy_unadapted"] + 0.3
    assert m["query_auc"] > 0.9 and min(m["query_sensitivity"], m["query_specificity"]) > 0.7
    assert m["query_n"] == 30
    # leak checks on patients: none shared with the support set, one seen by the meta-model's ingest
    assert m["query_patients_in_support"] == 0
    assert m["query_patients_in_meta_training_data"] == 1


def test_adapted_model_is_registered_and_predict_writes_one_row_per_scan(
    store: dict[str, Any], sets: dict[str, Path]
) -> None:
    c = tracking.client()
    mv = c.get_model_version_by_alias("fewscan-hernia", "current")  # "latest" is reserved by MLflow
    assert mv.run_id == store["run_id"]
    inputs = shutil.copytree(sets["query"], store["root"] / "to_predict")
    (inputs / "junk.dcm").write_bytes(b"junk")
    out = store["root"] / "pred.csv"
    summary = predict("models:/fewscan-hernia@latest", inputs, out)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "predicted_class", "prob_Hernia", "prob_No Finding", "error"]
    assert len(rows) == 31 and summary["n_scans"] == 31 and summary["n_errors"] == 1
    bad = [r for r in rows if r["error"]]
    assert (
        bad[0]["path"].endswith("junk.dcm")
        and bad[0]["prob_Hernia"] == ""
        and bad[0]["predicted_class"] == ""
    )
    good = [r for r in rows if not r["error"]]
    correct = sum(r["predicted_class"] == Path(r["path"]).parent.name for r in good)
    assert correct / len(good) >= 0.85
    # one scan alone = the same scan in the batch
    one = Path(good[3]["path"])
    single = store["root"] / "single.csv"
    predict(f"runs:/{store['run_id']}/adapted_model", one, single)
    (row,) = list(csv.DictReader(single.open()))
    assert float(row["prob_Hernia"]) == pytest.approx(float(good[3]["prob_Hernia"]), abs=1e-6)


def test_no_patient_data_or_file_names_reach_mlflow(store: dict[str, Any], sets: dict[str, Path]) -> None:
    phi = h.phi_strings(store["support"], sets["query"])
    assert SEEN in phi and "broken.dcm" in phi
    blobs = h.store_blobs(store["root"])
    leaks = sorted({v for v in phi for b in blobs if v.encode() in b})
    assert leaks == []


def test_error_paths_name_the_problem(store: dict[str, Any], sets: dict[str, Path], tmp_path: Path) -> None:
    mt = tracking.UpstreamRun.from_id(store["ids"]["meta-train"])
    with pytest.raises(ConfigError, match="has no method 'maml'; it has: fomaml"):
        choose_method(mt, "maml")
    ing = tracking.UpstreamRun.from_id(store["ids"]["ingest"])
    with pytest.raises(UpstreamError, match="has no models/ artifact"):
        choose_method(ing, None)
    from pipeline.serving import load_adapted

    with pytest.raises(
        UpstreamError, match="model 'models:/fewscan-nope@current' was not found in the registry"
    ):
        load_adapted("models:/fewscan-nope@current")
    with pytest.raises(UpstreamError, match="is a 'meta-train' run, but a 'adapt' run is needed"):
        load_adapted(store["ids"]["meta-train"])
    # a support set of another modality: refused, and the run is marked FAILED with the reason
    ct = h.write_set(tmp_path / "ct", {h.CONDITION: 3, h.NORMAL: 3}, seed=3, modality="CT")
    cfg = validate({"support": str(ct), "condition": h.CONDITION}, AdaptConfig, "test")
    with pytest.raises(FewscanError, match="modality CT, but the meta-model was trained on DX"):
        stages.execute_stage(
            "adapt", cfg, upstream={"meta-train": mt}, suite="adapttest", dataset="synthetic"
        )
    failed = tracking.client().search_runs([mt.experiment_id], "attributes.status = 'FAILED'")
    assert failed and "modality CT" in failed[0].data.tags["fewscan.error"]
    # too few scans for a class
    few = h.write_set(tmp_path / "few", {h.CONDITION: 1, h.NORMAL: 3}, seed=4)
    cfg = validate({"support": str(few), "min_per_class": 2}, AdaptConfig, "test")
    with pytest.raises(DataError, match="too few support scans: 'Hernia': 1 readable"):
        stages.execute_stage(
            "adapt", cfg, upstream={"meta-train": mt}, suite="adapttest", dataset="synthetic"
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
def test_mlflow_models_serve_answers_a_scoring_request(store: dict[str, Any], sets: dict[str, Path]) -> None:
    """`mlflow models serve` on the registered model, on loopback: DICOM bytes in, probabilities out."""
    import base64
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from pipeline.serving import load_adapted

    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store['root'] / 'mlflow' / 'mlflow.db'}")
    env.pop("PYTHONPATH", None)  # the model carries its own copy of the pipeline package (code path)
    # the server is started as `uvicorn` from PATH: the one next to this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/fewscan-hernia@current"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log = (store["root"] / "serve.log").open("wb")
    proc = subprocess.Popen(
        cmd, cwd=store["root"] / "data", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (store["root"] / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "server did not answer /ping within 240 s"
            time.sleep(1)
        files = sorted(sets["query"].rglob("*.dcm"))[:3]
        payload = {
            "dataframe_split": {
                "columns": ["dicom_base64"],
                "data": [[base64.b64encode(p.read_bytes()).decode()] for p in files] + [["bm90IGEgc2Nhbg=="]],
            }
        }
        req = urllib.request.Request(
            f"{base}/invocations",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            preds = json.loads(r.read())["predictions"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server's own process group, nothing else
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    assert len(preds) == 4
    local = load_adapted("models:/fewscan-hernia@current").predict_paths(files)
    for served, mine in zip(preds[:3], local):
        assert served["error"] == "" and served["predicted_class"] == mine["predicted_class"]
        assert served["prob_Hernia"] == pytest.approx(mine["prob_Hernia"], abs=1e-6)
        assert served["prob_Hernia"] + served["prob_No Finding"] == pytest.approx(1.0, abs=1e-6)
    assert preds[3]["error"].startswith("unreadable") and preds[3]["predicted_class"] is None
    assert preds[3]["prob_Hernia"] is None  # JSON null, not NaN
