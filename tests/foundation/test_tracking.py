from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.errors import TrackingError, UpstreamError


def test_import_mlflow_is_the_installed_package_not_the_repo_folder() -> None:
    repo = Path(__file__).resolve().parents[2]
    assert (repo / "mlflow").is_dir() and not (repo / "mlflow" / "__init__.py").exists()
    # run from the repo root, where ./mlflow/ sits first on sys.path
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlflow, sys; print(mlflow.__file__); print(hasattr(mlflow, 'start_run'))",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "site-packages" in out[0] and out[1] == "True"


def test_default_store_is_sqlite_under_mlflow(tmp_store: Path) -> None:
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_store / 'mlflow' / 'mlflow.db').resolve()}"
    with tracking.stage_run(
        "ingest", run_name="t", config={"a": {"b": 2}}, upstream={}, fp="x" * 24, suite=None, dataset="d"
    ) as run:
        (run.outdir / "f.txt").write_text("hi")
    up = tracking.latest_run("ingest", dataset="d")
    assert up.artifact("f.txt").read_text() == "hi"
    assert str(up.artifact("f.txt")).startswith(str(tmp_store / "mlflow" / "artifacts"))
    assert up.params == {"a.b": "2"}
    assert (tmp_store / "mlflow" / "mlflow.db").is_file()


def test_env_uri_overrides(tmp_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_store / "other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking.tracking_uri() == f"sqlite:///{other}"
    tracking.experiment_id("fewscan/x")
    assert other.is_file()


def test_missing_artifact_and_upstream_errors(tmp_store: Path) -> None:
    with pytest.raises(UpstreamError, match="no finished 'episodes' run for suite 's'"):
        tracking.latest_run("episodes", suite="s")
    with tracking.stage_run(
        "ingest", run_name="t", config={}, upstream={}, fp="y" * 24, suite=None, dataset="d"
    ) as run:
        rid = run.run_id
    up = tracking.UpstreamRun.from_id(rid, "ingest")
    with pytest.raises(UpstreamError, match="has no artifact 'nope.json'"):
        up.artifact("nope.json")
    with pytest.raises(UpstreamError, match="is a 'ingest' run, but a 'episodes' run is needed"):
        tracking.UpstreamRun.from_id(rid, "episodes")


def test_registry_alias_and_model_refs(tmp_store: Path) -> None:
    with tracking.stage_run(
        "meta-train", run_name="t", config={}, upstream={}, fp="z" * 24, suite="s", dataset="d"
    ) as run:
        run.log_state_dict({}, "models/maml")
        v = run.register_model("models/maml", "fewscan-s-meta", "latest")  # 'latest' is reserved -> current
        rid = run.run_id
        with pytest.raises(MlflowException):  # the alias moves only once the run is FINISHED
            tracking.client().get_model_version_by_alias("fewscan-s-meta", "current")
    assert v == "1"
    for ref in (
        rid,
        "fewscan-s-meta@current",
        "models:/fewscan-s-meta@current",
        "models:/fewscan-s-meta/1",
        "fewscan-s-meta@latest",
        "models:/fewscan-s-meta/latest",
    ):
        assert tracking.resolve_model_ref(ref) == rid
    with pytest.raises(UpstreamError, match="was not found in the registry"):
        tracking.resolve_model_ref("nosuch@current")
    # a run that fails after registering: its version stays, the alias does not move to it
    with pytest.raises(RuntimeError, match="after registering"):
        with tracking.stage_run(
            "meta-train", run_name="t2", config={}, upstream={}, fp="w" * 24, suite="s", dataset="d"
        ) as run:
            run.log_state_dict({}, "models/maml")
            assert run.register_model("models/maml", "fewscan-s-meta", "latest") == "2"
            raise RuntimeError("failed after registering")
    assert tracking.client().get_model_version_by_alias("fewscan-s-meta", "current").run_id == rid
    assert tracking.run_status(run.run_id) == "FAILED"
    # 'latest' and a bare name skip the failed run's version 2: the newest version whose run finished
    for ref in ("fewscan-s-meta@latest", "models:/fewscan-s-meta/latest", "fewscan-s-meta"):
        assert tracking.resolve_model_ref(ref) == rid, ref
    assert tracking.resolve_model_ref("models:/fewscan-s-meta/2") == run.run_id  # named: used as named
    tracking.client().delete_run(rid)
    with pytest.raises(
        UpstreamError,
        match=r"no version of 'fewscan-s-meta' comes from a finished run \(v2 failed, v1 deleted\)",
    ):
        tracking.resolve_model_ref("fewscan-s-meta@latest")


def test_retry_is_bounded_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def locked():
        calls.append(1)
        raise RuntimeError("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(tracking.store, "RETRY_SECONDS", 0.3)
    with pytest.raises(TrackingError, match="stayed locked"):
        tracking.retry(locked, "test")
    assert len(calls) > 1
    n = iter([RuntimeError("database is locked"), RuntimeError("database is locked")])

    def flaky():
        e = next(n, None)
        if e:
            raise e
        return 42

    assert tracking.retry(flaky, "test") == 42
    with pytest.raises(ValueError):
        tracking.retry(lambda: (_ for _ in ()).throw(ValueError("other")), "test")


def test_concurrent_writers_lose_no_run(tmp_store: Path) -> None:
    """Two processes writing runs into one SQLite store at once: every run lands, none corrupted."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from pipeline import tracking\n"
        "for i in range(6):\n"
        "    with tracking.stage_run('ingest', run_name=f'w{i}', config={'i': i, 'w': sys.argv[1]}, upstream={},\n"
        "                            fp=f'{sys.argv[1]}{i}', suite=None, dataset='c') as r:\n"
        "        r.log_metrics({'m': float(i)}, step=i)\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    tracking.experiment_id("fewscan/dataset-c")  # create the schema once, before the race
    procs = [subprocess.Popen([sys.executable, "-c", script, w, repo], cwd=tmp_store) for w in ("a", "b")]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    c = tracking.client()
    runs = c.search_runs([tracking.experiment_id("fewscan/dataset-c")], "", max_results=100)
    assert len(runs) == 12 and all(r.info.status == "FINISHED" for r in runs)


def test_threads_share_client_safely(tmp_store: Path) -> None:
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with tracking.stage_run(
                "ingest", run_name=f"t{k}", config={}, upstream={}, fp=f"t{k}", suite=None, dataset="th"
            ) as r:
                r.log_metrics({"k": k})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []


def _plant(experiment: str, tags: dict[str, str], status: str | None = "FINISHED") -> str:
    """A run created directly with MLflow in `experiment` (as another user would), with fewscan's tags."""
    c = tracking.client()
    run = c.create_run(tracking.experiment_id(experiment), tags=tags)
    if status:
        c.set_terminated(run.info.run_id, status)
    return str(run.info.run_id)


def test_searches_stay_in_the_suites_own_experiments(tmp_store: Path) -> None:
    """Runs with matching tags (stage, suite, dataset, fingerprint) in another experiment are never picked
    by upstream lookup, reuse or --resume; runs of the suite's and the dataset's experiments are."""
    fp = "f" * 24
    other = "fewscan/someone-else"
    _plant(other, {"fewscan.stage": "ingest", "fewscan.dataset": "d", "fewscan.fingerprint": fp})
    _plant(other, {"fewscan.stage": "episodes", "fewscan.suite": "s", "fewscan.fingerprint": fp})
    _plant(other, {"fewscan.stage": "meta-train", "fewscan.suite": "s"}, status="FAILED")
    with pytest.raises(UpstreamError, match="no finished 'ingest' run for dataset 'd'"):
        tracking.resolve_upstream("ingest", None, suite="s", dataset="d")
    with pytest.raises(UpstreamError, match="no finished 'episodes' run for suite 's'"):
        tracking.latest_run("episodes", suite="s")
    assert tracking.find_reusable("ingest", fp, suite="s", dataset="d") is None
    assert tracking.find_reusable("episodes", fp, suite="s", dataset="d") is None
    assert tracking.latest_unfinished("meta-train", "s") is None

    # the same runs in the suite's own experiment are found; ingest also in the dataset's experiment
    standalone = _plant("fewscan/dataset-d", {"fewscan.stage": "ingest", "fewscan.dataset": "d"})
    assert tracking.resolve_upstream("ingest", None, suite="s", dataset="d").run_id == standalone
    in_suite = _plant(
        "fewscan/s", {"fewscan.stage": "ingest", "fewscan.dataset": "d", "fewscan.fingerprint": fp}
    )
    assert tracking.resolve_upstream("ingest", None, suite="s", dataset="d").run_id == in_suite
    assert tracking.find_reusable("ingest", fp, suite="s", dataset="d") == in_suite
    assert tracking.find_reusable("ingest", fp, suite=None, dataset="d") is None  # standalone: its own only
    mine = _plant("fewscan/s", {"fewscan.stage": "meta-train", "fewscan.suite": "s"}, status="KILLED")
    assert tracking.latest_unfinished("meta-train", "s") == mine
    # a run named by id is used wherever it lives
    (planted,) = tracking.client().search_runs(
        [tracking.experiment_id(other)], "tags.`fewscan.stage` = 'episodes'"
    )
    assert (
        tracking.resolve_upstream("episodes", planted.info.run_id, suite="s", dataset="d").stage == "episodes"
    )


def test_no_owner_checks_on_a_local_store(tmp_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a user name set for a server elsewhere changes nothing on a local store: it has no users
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    assert tracking.server_user() is None
    rid = _plant("fewscan/s", {"fewscan.stage": "episodes", "fewscan.suite": "s"})
    assert tracking.latest_run("episodes", suite="s").run_id == rid


def test_processes_creating_the_owner_key_at_once_all_get_the_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key appears complete (never read half-written, which would say "damaged") and the first one
    made stays the key: experiments signed with it must keep counting as the user's (docs/scaling.md)."""
    key_file = tmp_path / "cfg" / "owner.key"
    monkeypatch.setenv("FEWSCAN_OWNER_KEY_FILE", str(key_file))
    start = threading.Barrier(8)
    keys: list[bytes] = []
    errors: list[BaseException] = []

    def create() -> None:
        start.wait()
        try:
            keys.append(tracking.owners._owner_key())
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(keys)) == 1 and keys[0] == key_file.read_text().strip().encode() and len(keys[0]) == 64
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in key_file.parent.iterdir()] == ["owner.key"]  # no temp file left behind
