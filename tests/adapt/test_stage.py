"""The adapt stage as an MLflow run, and `predict` on its registered model (a real SQLite store)."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline import stages, tracking
from pipeline.adapt.config import AdaptConfig
from pipeline.adapt.predict import predict
from pipeline.adapt.stage import choose_method
from pipeline.config import validate
from pipeline.errors import ConfigError, DataError, FewscanError, UpstreamError
from pipeline.names import adapted_model_name
from tests.adapt import helpers as h

SEEN = "SYN01003"  # a query patient that the meta-model's ingest also holds (a leak to report)
MODEL = adapted_model_name("adapttest", h.CONDITION)  # the registered name of the fixture's adapt run


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, meta_model_dir: Path, sets: dict[str, Path]
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)
        mp.setattr(tracking.store, "_client", None)
        mp.setattr(tracking.store, "_client_uri", None)
        ids = h.make_upstream_runs(meta_model_dir, seen_patients=[SEEN])
        support = shutil.copytree(sets["support"], root / "data" / "support")
        (support / h.CONDITION / "broken.dcm").write_bytes(b"\x00" * 300)  # unreadable: reported, skipped
        cfg = validate(
            {"support": str(support), "query": str(sets["query"]), "condition": h.CONDITION},
            AdaptConfig,
            "test",
        )
        upstream = {"meta-train": tracking.UpstreamRun.from_id(ids["meta-train"])}
        # adapt reads the ingest facts from meta_model.json alone: any lookup of another run (the walk back
        # meta-train -> episodes -> ingest, or the ingest run by id) is recorded and fails
        walked: list[str] = []

        def refuse(what: str) -> Any:
            def lookup(*args: Any, **kw: Any) -> Any:
                walked.append(f"{what}{args[1:] or args}")
                raise UpstreamError(f"test: adapt looked up another run ({what})")

            return lookup

        with pytest.MonkeyPatch.context() as no_lookup, mlflow_noise() as noise:
            no_lookup.setattr(tracking.UpstreamRun, "upstream", refuse("upstream"))
            no_lookup.setattr(tracking.UpstreamRun, "from_id", refuse("from_id"))
            out = stages.execute_stage(
                "adapt", cfg, upstream=upstream, suite="adapttest", dataset="synthetic"
            )
        yield {
            "walked": walked,
            "root": root,
            "ids": ids,
            "run_id": out.run_id,
            "summary": out.summary,
            "support": support,
            "noise": noise,
        }


class _Collect(logging.Handler):
    def __init__(self, said: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.said = said

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def mlflow_noise() -> Iterator[list[str]]:
    """What MLflow says while the block runs, as text: `warnings.warn` calls (MLflow's own and any other
    library's) and WARNING records of MLflow's loggers (it logs some warnings, e.g. the cloudpickle one)."""
    said: list[str] = []
    handler = _Collect(said)
    logger = logging.getLogger("mlflow")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logger.addHandler(handler)
        try:
            yield said
        finally:
            logger.removeHandler(handler)
            said.extend(f"{w.category.__name__}: {w.message} ({w.filename})" for w in seen)


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


def test_adapt_reads_the_ingest_facts_from_the_meta_model_alone(store: dict[str, Any]) -> None:
    # the fixture's adapt ran with every lookup of another run failing; it finished, checked the modality
    # (test_error_paths_name_the_problem) and the query patients, and looked nothing up
    assert store["walked"] == []
    assert _run(store["run_id"]).info.status == "FINISHED"


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
    mv = c.get_model_version_by_alias(MODEL, "current")  # "latest" is reserved by MLflow
    assert mv.run_id == store["run_id"]
    inputs = shutil.copytree(sets["query"], store["root"] / "to_predict")
    (inputs / "junk.dcm").write_bytes(b"junk")
    out = store["root"] / "pred.csv"
    summary = predict(f"models:/{MODEL}@latest", inputs, out)
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


def test_suites_register_apart_and_an_alias_moves_only_when_the_run_finishes(
    store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second suite adapting the same condition gets its own registered model and leaves the first
    suite's alias alone; a run that fails after registering its version leaves its own alias where it
    was (issue 18, 2d)."""
    from pipeline.adapt import stage as adapt_stage

    c = tracking.client()
    mt = tracking.UpstreamRun.from_id(store["ids"]["meta-train"])
    cfg = validate(
        {"support": str(store["support"]), "condition": h.CONDITION, "cv_folds": 0}, AdaptConfig, "test"
    )
    other = adapted_model_name("othersuite", h.CONDITION)
    assert other != MODEL
    first = stages.execute_stage(
        "adapt", cfg, upstream={"meta-train": mt}, suite="othersuite", dataset="synthetic"
    )
    assert f"registered {other} v1" in first.summary
    assert c.get_model_version_by_alias(other, "current").run_id == first.run_id
    assert c.get_model_version_by_alias(MODEL, "current").run_id == store["run_id"]  # not moved

    def fail_after_registering(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("injected after registration")

    monkeypatch.setattr(adapt_stage, "summary_line", fail_after_registering)
    with pytest.raises(RuntimeError, match="injected after registration"):
        stages.execute_stage(
            "adapt", cfg, upstream={"meta-train": mt}, suite="othersuite", dataset="synthetic"
        )
    (failed,) = c.search_runs(
        [tracking.experiment_id("fewscan/othersuite")], "attributes.status = 'FAILED'", max_results=5
    )
    versions = {int(v.version): v.run_id for v in c.search_model_versions(f"name = '{other}'")}
    assert versions == {1: first.run_id, 2: failed.info.run_id}  # registered, then the run failed
    assert int(c.get_model_version_by_alias(other, "current").version) == 1  # the alias stayed
    assert c.get_model_version_by_alias(MODEL, "current").run_id == store["run_id"]


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


# ---------------------------------------------------------------- the stored model: code + tensors, nothing pickled
class _Payload:
    """Unpickling it runs code: here it creates the file `marker` (a planted pickle could do anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _model_copy(store: dict[str, Any], dst: Path) -> Path:
    """A copy of the adapt run's model folder, to tamper with."""
    from pipeline.serving import local_model_dir

    return Path(shutil.copytree(local_model_dir(f"runs:/{store['run_id']}/adapted_model"), dst))


def _edit_mlmodel(folder: Path, **pyfunc: Any) -> None:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"].update(pyfunc)
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def test_the_adapted_model_is_code_plus_tensors_and_adapt_logs_it_quietly(store: dict[str, Any]) -> None:
    from pipeline.serving import local_model_dir

    folder = local_model_dir(f"models:/{MODEL}@current")
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    pf = mlmodel["flavors"]["python_function"]
    assert pf["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in pf
    shipped = Path(stages.__file__).parent / "adapt" / "fewscan_model.py"
    assert (folder / "fewscan_model.py").read_text() == shipped.read_text()
    assert (
        not pf.get("code") and not (folder / "code").exists()
    )  # no copy of the package: fewscan is installed
    assert "fewscan==" in (folder / "requirements.txt").read_text()
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle", ".joblib")]
    outputs = [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])]
    assert outputs == ["predicted_class", "prob_Hernia", "prob_No Finding", "error"]
    # MLflow said nothing about the model while adapt saved it: no cloudpickle warning, no "add type hints",
    # no "cannot infer a signature", no "no input example", no requirement inference trouble. (Only these:
    # what else MLflow may say, e.g. about system metrics on some machine, is not this test's business.)
    about_the_model = re.compile(r"(?i)pickle|type hint|signature|input.example|requirement|python_model")
    assert [n for n in store["noise"] if about_the_model.search(n)] == [], store["noise"]


def test_the_pyfunc_class_has_the_typed_predict_mlflow_asks_for(tmp_path: Path) -> None:
    """MLflow checks `predict` when the class is defined (at import): ours passes, an untyped one warns."""
    code = """if True:
        import json, warnings
        def said(fn):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                fn()
            return [str(w.message) for w in seen]
        def ours():
            import pipeline.serving
        def untyped():
            from mlflow.pyfunc import PythonModel
            class Untyped(PythonModel):
                def predict(self, context, model_input, params=None):
                    return model_input
        print(json.dumps([said(ours), said(untyped)]))
    """
    # run from tmp_path: the repo root holds the local store's `mlflow/` folder, which is no package
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    ours, untyped = json.loads(out.stdout.strip().splitlines()[-1])
    assert any("Add type hints to the `predict` method" in m for m in untyped)
    assert not any("type hint" in m.lower() for m in ours), ours


def test_predict_refuses_a_pickled_model_and_never_unpickles_it(
    store: dict[str, Any], sets: dict[str, Path], tmp_path: Path
) -> None:
    import mlflow.pyfunc

    marker = tmp_path / "payload-ran"

    class Planted(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context: Any, model_input: list[str], params: Any = None) -> list[str]:
            return model_input

        def __reduce__(self) -> tuple[Any, ...]:
            return _Payload(marker).__reduce__()

    # a model as MLflow saves a PythonModel object (what adapt did before): cloudpickled, the real weights
    adapted = _model_copy(store, tmp_path / "real") / "artifacts" / "adapted"
    planted = tmp_path / "planted"
    with mlflow_noise() as noise:
        # pip_requirements given: inferring them would load the model in a subprocess, running the payload
        mlflow.pyfunc.save_model(
            str(planted), python_model=Planted(), artifacts={"adapted": str(adapted)}, pip_requirements=[]
        )
    assert any("CloudPickle" in n for n in noise)  # the warning adapt printed then (and the capture works)
    assert (planted / "python_model.pkl").is_file() and not marker.exists()
    with pytest.raises(
        UpstreamError,
        match=r"refusing to load '.*planted': it is a pickled \(cloudpickle\) Python model\. .*re-run `fewscan adapt`",
    ):
        predict(str(planted), sets["query"] / h.CONDITION, tmp_path / "p.csv")
    assert not marker.exists() and not (tmp_path / "p.csv").exists()
    # the plant is live: unpickling it, which is what loading it through MLflow means, runs the payload
    with (planted / "python_model.pkl").open("rb") as fh:
        pickle.load(fh)
    assert marker.exists()


@pytest.mark.parametrize("plant", ["pickle next to the code", "other code file", "own loader module"])
def test_the_loader_refuses_any_other_form_of_model_before_running_it(
    plant: str, store: dict[str, Any], tmp_path: Path
) -> None:
    from pipeline.serving import load_adapted

    marker = tmp_path / "payload-ran"
    folder = _model_copy(store, tmp_path / "m")
    evil = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    if plant == "pickle next to the code":
        (folder / "python_model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
        why = "it is a pickled"
    elif plant == "other code file":
        (folder / "model.py").write_text(evil)
        _edit_mlmodel(folder, model_code_path="/anywhere/model.py")
        why = "it is loaded by 'mlflow.pyfunc.loaders.code_model' with code file 'model.py', not as a model from code"
    else:
        (folder / "code").mkdir()
        (folder / "code" / "evil_loader.py").write_text(evil)
        _edit_mlmodel(folder, loader_module="evil_loader", code="code")
        why = "it is loaded by 'evil_loader'"
    with pytest.raises(UpstreamError, match=f"refusing to load '[^']*': {re.escape(why)}"):
        load_adapted(str(folder))
    assert not marker.exists()


def test_fewscan_never_runs_the_code_file_a_model_carries(store: dict[str, Any], tmp_path: Path) -> None:
    """Only `mlflow models serve` runs fewscan_model.py; fewscan reads the weights with its installed code."""
    from pipeline.serving import load_adapted

    marker = tmp_path / "payload-ran"
    folder = _model_copy(store, tmp_path / "m")
    (folder / "fewscan_model.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    assert load_adapted(str(folder)).classes == ["Hernia", "No Finding"]
    assert not marker.exists()


@pytest.mark.parametrize(
    "target", ["artifacts/adapted/adapted_state.pth", "artifacts/adapted/meta_model/state_dict.pth"]
)
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_weights_holding_a_pickled_object_are_refused_unread(
    target: str, how: str, store: dict[str, Any], tmp_path: Path
) -> None:
    from pipeline.serving import load_adapted

    marker = tmp_path / "payload-ran"
    folder = _model_copy(store, tmp_path / "m")
    state = {"params.head.weight": _Payload(marker)}
    if how == "torch.save":
        torch.save(state, folder / target)
    else:
        (folder / target).write_bytes(pickle.dumps(state))
    with pytest.raises(UpstreamError, match=r"holds more than tensors \(a pickled object\); refused unread"):
        load_adapted(str(folder))
    assert not marker.exists()
    # the plant is live: loading it without weights_only runs the payload (a plain pickle: before torch
    # finds no magic number after it)
    with contextlib.suppress(RuntimeError):
        torch.load(folder / target, weights_only=False)
    assert marker.exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
def test_mlflow_models_serve_answers_a_scoring_request(store: dict[str, Any], sets: dict[str, Path]) -> None:
    """`mlflow models serve` on the registered model, on loopback: DICOM bytes in, probabilities out."""
    import base64
    import os
    import signal
    import time
    import urllib.error
    import urllib.request

    from pipeline.serving import load_adapted

    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store['root'] / 'mlflow' / 'mlflow.db'}")
    env.pop("PYTHONPATH", None)  # the model's code file imports the installed fewscan, not the checkout
    # the server is started as `uvicorn` from PATH: the one next to this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@current"]
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
    local = load_adapted(f"models:/{MODEL}@current").predict_paths(files)
    for served, mine in zip(preds[:3], local):
        assert served["error"] == "" and served["predicted_class"] == mine["predicted_class"]
        assert served["prob_Hernia"] == pytest.approx(mine["prob_Hernia"], abs=1e-6)
        assert served["prob_Hernia"] + served["prob_No Finding"] == pytest.approx(1.0, abs=1e-6)
    assert preds[3]["error"].startswith("unreadable") and preds[3]["predicted_class"] is None
    assert preds[3]["prob_Hernia"] is None  # JSON null, not NaN


# ---------------------------------------------------------------- a model that says nothing must say so
@pytest.fixture(scope="module")
def imbalanced(store: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A barely adapted model (3 inner steps at lr 0.05) on an imbalanced support set (3 discs, 12 normal):
    with plain cross-entropy and the argmax it calls every query scan normal, like the issue's Fibrosis set.
    The same adaptation with fewscan's defaults (the support-score threshold) is the second run; the argmax
    with the loss the default gives it (class-balanced) the third."""
    root = tmp_path_factory.mktemp("imbalanced")
    support = h.write_set(root / "support", {h.CONDITION: 3, h.NORMAL: 12}, seed=21, first_patient=3000)
    query = h.write_set(root / "query", {h.CONDITION: 15, h.NORMAL: 15}, seed=22, first_patient=4000)
    mt = tracking.UpstreamRun.from_id(store["ids"]["meta-train"])
    out: dict[str, Any] = {"query": query}
    runs = {
        "argmax": {"balanced_loss": False, "threshold": "argmax"},
        "default": {},
        "balanced-argmax": {"threshold": "argmax"},
    }
    for name, extra in runs.items():
        cfg = validate(
            {"support": str(support), "query": str(query), "steps": 3, "lr": 0.05}
            | {"register_name": f"fewscan-imbalanced-{name}", **extra},
            AdaptConfig,
            "test",
        )
        res = stages.execute_stage(
            "adapt", cfg, upstream={"meta-train": mt}, suite="adapttest", dataset="synthetic"
        )
        out[name] = {"run_id": res.run_id, "summary": res.summary, "metrics": _run(res.run_id).data.metrics}
    return out


def test_a_collapsed_model_is_called_out_in_the_summary(imbalanced: dict[str, Any]) -> None:
    m, summary = imbalanced["argmax"]["metrics"], imbalanced["argmax"]["summary"]
    # unadapted (shared head): every scan 'Hernia'; adapted by the argmax: every scan 'No Finding'
    assert m["query_sensitivity_unadapted"] == 1.0 and m["query_specificity_unadapted"] == 0.0
    assert m["query_sensitivity"] == 0.0 and m["query_predicted_one_class"] == 1.0
    assert m["query_balanced_accuracy"] == 0.5 and m["query_accuracy"] == 0.5
    assert summary.startswith("adapted fomaml to 'Hernia': query balanced acc 0.500, sensitivity 0.000, ")
    assert "WARNING: the adapted model predicted 'No Finding' for every query scan (sensitivity 0)" in summary


def test_the_default_threshold_recovers_the_condition_and_predict_applies_it(
    imbalanced: dict[str, Any], tmp_path: Path
) -> None:
    from pipeline.serving import load_adapted

    m, summary = imbalanced["default"]["metrics"], imbalanced["default"]["summary"]
    assert m["query_sensitivity"] > 0.5 and m["query_specificity"] > 0.5, summary
    assert m["query_predicted_one_class"] == 0.0 and "WARNING" not in summary
    assert m["query_balanced_accuracy"] > imbalanced["argmax"]["metrics"]["query_balanced_accuracy"] + 0.2
    assert 0.0 < m["threshold"] < 0.5  # the barely moved model's scores all lie below 0.5
    assert 0.5 < m["support_cv_balanced_accuracy"] <= 1.0  # held-out support scans (leave-one-out)
    clf = load_adapted(f"runs:/{imbalanced['default']['run_id']}/adapted_model")
    assert clf.card["loss"] == "cross-entropy" and clf.card["steps"] == 3
    assert clf.card["decision"]["rule"] == "threshold" and clf.threshold == pytest.approx(m["threshold"])
    # fewscan predict: the stored threshold decides the class; the probabilities are the network's
    out = tmp_path / "pred.csv"
    predict(f"runs:/{imbalanced['default']['run_id']}/adapted_model", imbalanced["query"], out)
    rows = list(csv.DictReader(out.open()))
    p = [float(r["prob_Hernia"]) for r in rows]
    assert [r["predicted_class"] for r in rows] == [
        h.CONDITION if v >= clf.threshold else h.NORMAL for v in p
    ]
    assert any(v < 0.5 and r["predicted_class"] == h.CONDITION for v, r in zip(p, rows))  # not the argmax
    sens = [r["predicted_class"] == h.CONDITION for r in rows if Path(r["path"]).parent.name == h.CONDITION]
    assert sum(sens) / len(sens) == pytest.approx(m["query_sensitivity"])


def test_the_class_balanced_loss_keeps_the_argmax_from_the_majority_class(imbalanced: dict[str, Any]) -> None:
    """The same barely adapted model predicted by its argmax, with the class-balanced inner loss (what
    `balanced_loss` defaults to without the support threshold): no longer every scan 'No Finding'."""
    m = imbalanced["balanced-argmax"]["metrics"]
    assert m["query_sensitivity"] > 0.0 and m["query_specificity"] > 0.0
    assert m["query_predicted_one_class"] == 0.0 and m["threshold"] == 0.5
    assert m["query_balanced_accuracy"] > imbalanced["argmax"]["metrics"]["query_balanced_accuracy"]
