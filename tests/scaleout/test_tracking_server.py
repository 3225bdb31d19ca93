"""fewscan against a shared `mlflow server` with basic auth, on 127.0.0.1 only.

The server: SQLite backend store, artifacts proxied by the server into a local folder
(`--artifacts-destination`), `--app-name basic-auth` with its own user database. The admin password and
the users' passwords are made up per test session and travel in environment variables only
(`MLFLOW_AUTH_ADMIN_PASSWORD` for the server, `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD` for
fewscan); the auth config file names no password.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .helpers import free_port, require

pytestmark = pytest.mark.e2e

try:
    import flask_wtf  # noqa: F401
except ImportError:  # mlflow[auth] is declared (pyproject.toml): missing here, it fails under CI
    require(False, "the basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'")

STARTUP_S = 180  # first start migrates two fresh SQLite databases; slow on a busy 2-core machine
STAGES = ("ingest", "episodes", "meta-train", "adapt", "evaluate")
UPSTREAM = {"episodes": "ingest", "meta-train": "episodes", "adapt": "meta-train", "evaluate": "meta-train"}


@dataclass
class Server:
    url: str
    root: Path
    user: str
    password: str
    admin_password: str

    def request(self, path: str, auth: tuple[str, str] | None, body: dict | None = None) -> tuple[int, str]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode() if body is not None else None,
            method="POST" if body is not None else "GET",
            headers={"Content-Type": "application/json"},
        )
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def env(self, user: str | None = None, password: str | None = None) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user or self.user,
            "MLFLOW_TRACKING_PASSWORD": password or self.password,
        }


def _mlflow_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "mlflow"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    auth_ini = root / "basic_auth.ini"
    # No password in the file: the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD (MLflow 3.17 ships none).
    auth_ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.sqlite'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # cache verified credentials for a minute (PBKDF2 per request is slow on 2 cores)
        "auth_cache_ttl_seconds = 60\n"
    )
    admin_password = secrets.token_urlsafe(18)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
    )
    cmd = _mlflow_cmd() + [
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'db.sqlite'}",
        "--artifacts-destination",
        str(root / "art"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--app-name",
        "basic-auth",
        "--workers",
        "1",
    ]
    log = (root / "server.log").open("w")
    # own session: teardown ends the server and its uvicorn worker (this group only, by its id)
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited ({proc.returncode}):\n{(root / 'server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not up within {STARTUP_S} s:\n{(root / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(1)
        srv = Server(url, root, "fewscan-ci", secrets.token_urlsafe(18), admin_password)
        code, text = srv.request(
            "/api/2.0/mlflow/users/create",
            ("admin", admin_password),
            {"username": srv.user, "password": srv.password},
        )
        assert code == 200, text
        yield srv
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture
def as_user(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Server:
    """This process talks to the server as the fewscan user (environment only), from a fresh folder."""
    from pipeline import tracking

    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking.store, "_client", None)
    monkeypatch.setattr(tracking.store, "_client_uri", None)
    return server


def test_requests_without_valid_credentials_are_refused(server: Server) -> None:
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert server.request(path, None)[0] == 401
    assert server.request(path, (server.user, "wrong-password-123"))[0] == 401
    code, text = server.request(path, (server.user, server.password))
    assert code == 200 and "experiments" in json.loads(text)
    # the fewscan user is no admin: it cannot create users
    code, _ = server.request(
        "/api/2.0/mlflow/users/create",
        (server.user, server.password),
        {"username": "x", "password": "y" * 14},
    )
    assert code == 403


def test_stage_runs_artifacts_and_registry_through_the_server(as_user: Server, tmp_path: Path) -> None:
    from pipeline import tracking

    assert tracking.tracking_uri() == as_user.url and not tracking.is_default_store()
    with tracking.stage_run(
        "ingest",
        run_name="t ingest",
        config={"a": {"b": 2}},
        upstream={},
        fp="a" * 24,
        suite=None,
        dataset="srv",
    ) as run:
        (run.outdir / "store").mkdir()
        (run.outdir / "store" / "store.json").write_text(json.dumps({"n_images": 3}))
        ingest_id = run.run_id
    up = tracking.latest_run("ingest", dataset="srv")
    assert up.run_id == ingest_id and up.artifact_uri.startswith("mlflow-artifacts:")
    # downloaded through the server into the local cache, not read from the server's folder
    local = up.artifact("store/store.json")
    assert json.loads(local.read_text()) == {"n_images": 3}
    assert tmp_path in local.parents
    stored = list((as_user.root / "art").rglob("store.json"))
    assert len(stored) == 1 and ingest_id in str(stored[0])

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    with tracking.stage_run(
        "meta-train",
        run_name="t meta",
        config={},
        upstream={"ingest": up},
        fp="b" * 24,
        suite="srv",
        dataset="srv",
    ) as run:
        run.log_state_dict(state, "models/maml")
        run.log_metrics({"val_acc": 0.75}, step=1)
        version = run.register_model("models/maml", "fewscan-srv-meta", alias="current")
        meta_id = run.run_id
    assert version == "1"
    assert tracking.resolve_model_ref("models:/fewscan-srv-meta@current") == meta_id
    meta = tracking.UpstreamRun.from_id(meta_id, expect_stage="meta-train")
    assert meta.upstream("ingest").run_id == ingest_id
    loaded = torch.load(meta.artifact("models/maml") / "state_dict.pth")
    torch.testing.assert_close(loaded["w"], state["w"])


def test_a_folder_artifact_is_complete_after_one_of_its_files_was_fetched(as_user: Server) -> None:
    import numpy as np

    from pipeline import tracking

    with tracking.stage_run(
        "ingest", run_name="cache", config={}, upstream={}, fp="d" * 24, suite=None, dataset="cache"
    ) as run:
        (run.outdir / "store").mkdir()
        np.save(run.outdir / "store" / "images.npy", np.zeros((2, 1, 4, 4), dtype=np.float16))
        (run.outdir / "store" / "store.json").write_text("{}")
    up = tracking.latest_run("ingest", dataset="cache")
    assert up.artifact("store/store.json").read_text() == "{}"  # one file first, as the episodes stage does
    store = up.artifact("store")  # then the folder, as meta-train and evaluate do
    assert sorted(p.name for p in store.iterdir()) == ["images.npy", "store.json"]


def test_another_user_can_read_but_not_write_fewscan_runs(
    as_user: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    with tracking.stage_run(
        "ingest", run_name="owned", config={}, upstream={}, fp="c" * 24, suite=None, dataset="perm"
    ) as run:
        run_id = run.run_id
    reader, pw = "reader", secrets.token_urlsafe(18)
    code, text = as_user.request(
        "/api/2.0/mlflow/users/create",
        ("admin", as_user.admin_password),
        {"username": reader, "password": pw},
    )
    assert code == 200, text
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", reader)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", pw)
    c = MlflowClient(tracking_uri=as_user.url)
    assert c.get_run(run_id).data.tags["fewscan.stage"] == "ingest"  # default permission: READ
    with pytest.raises(MlflowException, match="(?i)permission"):
        c.log_metric(run_id, "tampered", 1.0)


def test_quick_demo_chain_runs_against_the_server(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(server.env())
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert not (tmp_path / "mlflow" / "mlflow.db").exists()  # nothing went to the default local store

    from mlflow.tracking import MlflowClient

    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    c = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = {
        s: c.search_runs(exps, f"tags.`fewscan.stage` = '{s}' and tags.`fewscan.suite` = 'demo_quick'")
        for s in STAGES
    }
    assert {s: len(r) for s, r in runs.items()} == {s: 1 for s in STAGES}
    ids = {s: r[0].info.run_id for s, r in runs.items()}
    for s, (run,) in runs.items():
        assert run.info.status == "FINISHED", (s, run.data.tags.get("fewscan.error"))
        if s in UPSTREAM:
            assert run.data.tags[f"fewscan.upstream.{UPSTREAM[s]}"] == ids[UPSTREAM[s]]
        arts = [a.path for a in c.list_artifacts(run.info.run_id)]
        assert arts, f"{s} run has no artifacts on the server"
        # the bytes live in the server's artifact folder
        assert any((server.root / "art").rglob(f"*{run.info.run_id}*")), s
    assert "report.md" in [a.path for a in c.list_artifacts(ids["evaluate"])]
    mv = c.get_model_version_by_alias("fewscan-demo_quick-meta", "current")
    assert mv.run_id == ids["meta-train"]


def become_user(
    monkeypatch: pytest.MonkeyPatch, server: Server, user: str, password: str, key_dir: Path
) -> None:
    """This process acts as `user` on the server from now on: credentials, an owner key of its own, and a
    fresh tracking client (fewscan caches one per URI)."""
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("FEWSCAN_OWNER_KEY_FILE", str(key_dir / f"{user}.key"))
    monkeypatch.setattr(tracking.store, "_client", None)
    monkeypatch.setattr(tracking.store, "_client_uri", None)


def _create_user(server: Server, name: str) -> str:
    password = secrets.token_urlsafe(18)
    code, text = server.request(
        "/api/2.0/mlflow/users/create",
        ("admin", server.admin_password),
        {"username": name, "password": password},
    )
    assert code == 200, text
    return password


def _grant(server: Server, owner: tuple[str, str], user: str, experiment_id: str, permission: str) -> None:
    code, text = server.request(
        "/api/3.0/mlflow/users/permissions/grant",
        owner,
        {
            "username": user,
            "resource_type": "experiment",
            "resource_id": experiment_id,
            "permission": permission,
        },
    )
    assert code == 200, text


def test_another_users_planted_runs_are_never_used(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory plants runs that claim to be Alice's (forged user_id, matching tags and fingerprint, a
    malicious checkpoint) in his own experiment and in experiments named like Alice's suite and dataset,
    copies her owner tags, and grants her MANAGE on all of them. Alice's upstream lookup, reuse and
    --resume never pick them; resuming his run by id is her explicit choice, and its checkpoint is refused
    without running the payload."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.errors import DataError, TrackingError, UpstreamError
    from pipeline.metatrain import stage as metatrain
    from tests.metatrain.planted import plant_checkpoint

    pw = {u: _create_user(server, u) for u in ("alice", "mallory")}
    monkeypatch.chdir(tmp_path)

    def become(user: str) -> MlflowClient:
        become_user(monkeypatch, server, user, pw[user], tmp_path)
        return MlflowClient(tracking_uri=server.url)

    fp = "e" * 24

    def ingest(run_name: str) -> str:
        with tracking.stage_run(
            "ingest", run_name=run_name, config={}, upstream={}, fp=fp, suite="study2", dataset="lab"
        ) as run:
            return run.run_id

    # Alice's own suite; she lets Mallory write into it
    c = become("alice")
    mine = ingest("alice's ingest")
    own_exp = tracking.experiment_id("fewscan/study2")
    assert c.get_run(mine).info.user_id == "alice"
    _grant(server, ("alice", pw["alice"]), "mallory", own_exp, "EDIT")
    owner_tags = {k: v for k, v in c.get_experiment(own_exp).tags.items() if k.startswith("fewscan.owner")}
    assert owner_tags

    # Mallory plants
    c = become("mallory")
    marker = tmp_path / "payload-ran"
    checkpoint = plant_checkpoint(tmp_path / "plant" / "last.pt", marker)
    ingest_tags = {"fewscan.stage": "ingest", "fewscan.dataset": "lab", "fewscan.fingerprint": fp}
    meta_tags = {"fewscan.stage": "meta-train", "fewscan.suite": "study", "fewscan.upstream.episodes": mine}
    planted: dict[str, tuple[str, str]] = {}
    for name in ("mallory/own", "fewscan/study", "fewscan/dataset-lab"):
        exp = c.create_experiment(name)
        for k, v in owner_tags.items():  # copied from Alice's experiment: they prove nothing here
            c.set_experiment_tag(exp, k, v)
        ing = c.create_run(exp, tags={**ingest_tags, "mlflow.user": "alice"})
        c.set_terminated(ing.info.run_id, "FINISHED")
        meta = c.create_run(exp, tags={**meta_tags, "mlflow.user": "alice"})  # left RUNNING: resumable
        c.log_artifact(meta.info.run_id, str(checkpoint), "checkpoints/maml")
        _grant(server, ("mallory", pw["mallory"]), "alice", exp, "MANAGE")  # a non-admin may grant MANAGE
        planted[name] = (ing.info.run_id, meta.info.run_id)
    # the MLflow fact behind the design: the server keeps whatever user_id the client sends
    assert c.get_run(planted["fewscan/study"][0]).info.user_id == "alice"
    # and in Alice's experiment, where she let him write, a newer ingest run of his own
    theirs = c.create_run(own_exp, tags={**ingest_tags, "fewscan.suite": "study2"})
    c.set_terminated(theirs.info.run_id, "FINISHED")

    # Alice never picks his runs
    become("alice")
    assert tracking.latest_unfinished("meta-train", "study") is None
    with pytest.raises(UpstreamError, match="no finished 'ingest' run"):
        tracking.latest_run("ingest", suite="study", dataset="lab")
    assert tracking.find_reusable("ingest", fp, suite="study", dataset="lab") is None
    assert tracking.latest_run("ingest", suite="study2", dataset="lab").run_id == mine
    assert tracking.find_reusable("ingest", fp, suite="study2", dataset="lab") == mine
    # and her stages refuse to write into the experiment he squatted, naming the fix
    with (
        pytest.raises(TrackingError, match=r"'fewscan/study' .*not created by you \(alice\).*another name"),
        tracking.stage_run(
            "ingest", run_name="x", config={}, upstream={}, fp=fp, suite="study", dataset="lab"
        ),
    ):
        pass

    # resuming his run by id is her explicit choice: allowed, and the checkpoint is still refused
    _, meta_id = planted["mallory/own"]
    with (
        pytest.raises(DataError, match="holds more than weights"),
        tracking.stage_run(
            "meta-train",
            run_name="resume",
            config={},
            upstream={},
            fp=fp,
            suite="study2",
            dataset="lab",
            resume_run_id=meta_id,
        ) as run,
    ):
        metatrain.resume_checkpoint(run, "maml", tmp_path / "ck")
    assert not marker.exists()
    assert tracking.run_status(meta_id) == "FAILED"
