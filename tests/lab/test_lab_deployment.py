"""The lab deployment of docs/scaling.md ('For a lab') on real servers, all on 127.0.0.1: PostgreSQL as
the backend store (and as the basic-auth app's user database), an S3-compatible server (moto, a separate
process) as the artifact store, behind `mlflow server --app-name basic-auth` with artifacts proxied by the
server. Users: alice and bob, no admin; `default_permission = NO_PERMISSIONS`, so each user sees only
the experiments they created or were granted.

Checked: the quick chain as alice leaves five linked FINISHED stage runs whose rows are in PostgreSQL and
whose artifacts are objects in the bucket (the client has no S3 credentials at all); bob, who was given
nothing, is refused reading and writing alice's experiment (403, naming the permission) and his fewscan
command says so in one line; requests without or with wrong credentials get 401; alice and bob running a
chain each at the same time both finish with every run, artifact and registered model in place.

Skipped, with the reason, where PostgreSQL's server programs, psycopg, moto[server] or boto3 are
missing, and a failure instead under CI (`CI` set), since `.ci/run` installs them (`apt-get install
postgresql`, `pip install -e '.[lab]'`).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.services import (
    S3,
    Postgres,
    postgres,
    s3_server,
    stop_group,
    wait_http,
    why_missing_postgres,
    why_missing_s3,
)
from tests.scaleout.helpers import free_port, require
from tests.scaleout.test_tracking_server import STAGES, UPSTREAM, Server, _create_user, _mlflow_cmd

pytestmark = pytest.mark.e2e

# skipped where a component is missing, but a failure under CI, which installs them all (.ci/run)
_missing = why_missing_postgres() or why_missing_s3()
require(not _missing, f"lab deployment test: {_missing}")

BUCKET = "fewscan-lab"
STARTUP_S = 240  # the server migrates two empty PostgreSQL databases first; slow on a busy 2-core machine
CHAIN_S = 900
# The quick suite (tasks/demo_quick.yaml) cut to a smoke-test budget: this test is about the deployment,
# not about learning; every stage still runs, logs, uploads and registers as in a real chain.
QUICK = [
    "meta_train.outer.steps=4", "meta_train.seeds=[0]", "meta_train.val_every=2",
    "meta_train.checkpoint_every=2", "meta_train.val_episodes=2",
    "episodes.kinds=[binary]", "episodes.k_shot=[1]", "episodes.val_episodes=2", "episodes.test_episodes=4",
    "evaluate.val_episodes=2", "evaluate.curve_steps=1", "evaluate.curve_episodes=2",
    "evaluate.finetune.steps=[2]", "evaluate.finetune.pretrain.max_epochs=1", "evaluate.scratch.steps=[2]",
]  # fmt: skip


@dataclass
class Lab:
    server: Server  # its `user`/`password` are alice's
    pg: Postgres
    s3: S3
    passwords: dict[str, str]
    demo_data: Path

    def env(self, user: str, folder: Path) -> dict[str, str]:
        """A client's environment: the server address and the user's MLflow credentials, nothing else of
        the deployment (no database or S3 settings: artifacts travel through the server)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "AWS_", "PG")) and k != "FEWSCAN_OWNER_KEY_FILE"
        }
        env.update(
            MLFLOW_TRACKING_URI=self.server.url,
            MLFLOW_TRACKING_USERNAME=user,
            MLFLOW_TRACKING_PASSWORD=self.passwords[user],
            MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
            FEWSCAN_OWNER_KEY_FILE=str(folder / ".owner.key"),  # each user's own key (docs/scaling.md)
        )
        return env

    def auth(self, user: str) -> tuple[str, str]:
        return (user, self.passwords[user])


def _generate_demo_data(folder: Path) -> Path:
    """tasks/demo_quick.yaml's synthetic study, generated once and linked into each user's folder."""
    from pipeline.demo import ensure_demo_data

    cwd = Path.cwd()
    os.chdir(folder)  # the suite's paths (demo_data/demo_quick/...) are relative to the working folder
    try:
        ensure_demo_data("demo_quick")
    finally:
        os.chdir(cwd)
    return folder / "demo_data"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lab")
    demo_data = _generate_demo_data(root)
    with postgres(free_port(), ("mlflow", "mlflow_auth")) as pg, s3_server(free_port(), BUCKET, root) as s3:
        auth_ini = root / "basic_auth.ini"
        # the recipe's file: no password in it; the user database in PostgreSQL too (its own database)
        auth_ini.write_text(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {pg.uri('mlflow_auth')}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n"
        )
        admin_password = secrets.token_urlsafe(18)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PG"))}
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
            MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
            PGPASSWORD=pg.password,
            MLFLOW_S3_ENDPOINT_URL=s3.endpoint,
            # no ~/.aws of this machine: only the credentials given here
            AWS_CONFIG_FILE=str(root / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"),
            **S3.credentials,
        )
        port = free_port()
        cmd = _mlflow_cmd() + [
            "server",
            "--backend-store-uri", pg.uri("mlflow"),
            "--artifacts-destination", f"s3://{BUCKET}/artifacts",
            "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(port),
            "--app-name", "basic-auth",
            "--workers", "2",
        ]  # fmt: skip
        log_path = root / "mlflow-server.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                url = f"http://127.0.0.1:{port}"
                wait_http(url + "/health", proc, log_path, "mlflow server", STARTUP_S)
                srv = Server(url, root, "alice", "", admin_password)
                passwords = {u: _create_user(srv, u) for u in ("alice", "bob")}
                srv.password = passwords["alice"]
                yield Lab(srv, pg, s3, passwords, demo_data)
            finally:
                stop_group(proc)


@contextmanager
def _as_user(lab: Lab, user: str) -> Iterator[None]:
    """This process's MLflow client calls made as `user` (MLflow reads the credentials per request)."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=lab.passwords[user])
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_chain(lab: Lab, user: str, suite: str, folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "demo_data").symlink_to(lab.demo_data, target_is_directory=True)
    with (folder / "chain.log").open("w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "demo_quick", "--set", f"name={suite}"]
            + [a for o in QUICK for a in ("--set", o)],
            cwd=folder,
            env={**lab.env(user, folder), "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # torn down with its group if the test gives up on it
        )


def _wait_chains(procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    deadline = time.monotonic() + CHAIN_S
    try:
        for name, (proc, folder) in procs.items():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            out = (folder / "chain.log").read_text(errors="replace")
            assert proc.returncode == 0, f"{name}'s chain exited {proc.returncode}:\n{out[-6000:]}"
            assert not (folder / "mlflow").exists(), f"{name}: something went to a local ./mlflow store"
    finally:
        for proc, _ in procs.values():
            stop_group(proc)


def _check_chain(lab: Lab, user: str, suite: str) -> dict[str, str]:
    """Five linked FINISHED stage runs of `suite`, created by `user`, each with its rows in PostgreSQL and
    its artifacts as objects in the bucket; the meta-model registered. Returns {stage: run id}."""
    from mlflow.tracking import MlflowClient

    with _as_user(lab, user):
        c = MlflowClient(tracking_uri=lab.server.url, registry_uri=lab.server.url)
        exp = c.get_experiment_by_name(f"fewscan/{suite}")
        assert exp is not None, f"no experiment fewscan/{suite}"
        runs = {s: c.search_runs([exp.experiment_id], f"tags.`fewscan.stage` = '{s}'") for s in STAGES}
        assert {s: len(r) for s, r in runs.items()} == {s: 1 for s in STAGES}, "a stage ran twice or never"
        ids = {s: r[0].info.run_id for s, r in runs.items()}
        for s, (run,) in runs.items():
            assert run.info.status == "FINISHED", (suite, s, run.data.tags.get("fewscan.error"))
            assert run.info.user_id == user
            assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied
            if s in UPSTREAM:
                assert run.data.tags[f"fewscan.upstream.{UPSTREAM[s]}"] == ids[UPSTREAM[s]]
            assert c.list_artifacts(run.info.run_id), f"{suite} {s} run lists no artifacts"
        assert "report.md" in [a.path for a in c.list_artifacts(ids["evaluate"])]
        mv = c.get_model_version_by_alias(f"fewscan-{suite}-meta", "current")
        assert mv.run_id == ids["meta-train"] and mv.status == "READY"

    # the bytes are objects in the bucket, under the server's artifacts destination
    keys = lab.s3.keys("artifacts/")
    for s, run_id in ids.items():
        mine = [k for k in keys if f"/{run_id}/artifacts/" in k]
        assert mine, f"{suite} {s} run {run_id}: no object in s3://{BUCKET}/artifacts"
    assert any(k.endswith(f"{ids['evaluate']}/artifacts/report.md") for k in keys)
    assert any(f"{ids['meta-train']}/artifacts/models/" in k for k in keys)
    report = lab.s3.client().get_object(Bucket=BUCKET, Key=next(k for k in keys if k.endswith("report.md")))
    assert report["ContentLength"] > 0

    # and the runs are rows of PostgreSQL's `runs` table, as MLflow reports them
    conn = lab.pg.connect("mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT r.run_uuid, r.status, r.user_id FROM runs r JOIN experiments e "
                "ON r.experiment_id = e.experiment_id WHERE e.name = %s AND r.lifecycle_stage = 'active'",
                (f"fewscan/{suite}",),
            )
            rows = {run_id: (status, uid) for run_id, status, uid in cur.fetchall()}
    finally:
        conn.close()
    for run_id in ids.values():
        assert rows.get(run_id) == ("FINISHED", user), (suite, run_id, rows.get(run_id))
    return ids


@pytest.fixture(scope="module")
def alice_chain(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("alice")
    _wait_chains({"alice": (_start_chain(lab, "alice", "lab_alice", folder), folder)})
    return _check_chain(lab, "alice", "lab_alice")


def test_requests_without_valid_credentials_are_refused(lab: Lab) -> None:
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert lab.server.request(path, None)[0] == 401
    assert lab.server.request(path, ("alice", "wrong-password-123"))[0] == 401
    assert lab.server.request(path, ("nobody", "no-such-user-1234"))[0] == 401
    assert lab.server.request("/api/2.0/mlflow-artifacts/artifacts?path=", None)[0] == 401
    code, text = lab.server.request(path, lab.auth("alice"))
    assert code == 200 and isinstance(json.loads(text).get("experiments", []), list), (code, text)
    # and the user database is PostgreSQL's, with alice and bob in it
    conn = lab.pg.connect("mlflow_auth")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT username, is_admin FROM users ORDER BY username")
            assert cur.fetchall() == [("admin", True), ("alice", False), ("bob", False)]
    finally:
        conn.close()


def test_quick_chain_as_one_user_lands_in_postgres_and_the_bucket(alice_chain: dict[str, str]) -> None:
    # _check_chain asserted the runs, their rows and their objects; here: they are five distinct runs
    assert set(alice_chain) == set(STAGES) and len(set(alice_chain.values())) == len(STAGES)


def test_a_user_without_permission_can_neither_read_nor_write_the_experiment(
    lab: Lab, alice_chain: dict[str, str], tmp_path: Path
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    bob = lab.auth("bob")
    code, text = lab.server.request(
        "/api/2.0/mlflow/experiments/get-by-name?experiment_name=fewscan/lab_alice", bob
    )
    assert code == 403 and "Permission denied" in text, (code, text)
    run_id = alice_chain["evaluate"]
    exp_id = json.loads(
        lab.server.request(f"/api/2.0/mlflow/runs/get?run_id={run_id}", lab.auth("alice"))[1]
    )["run"]["info"]["experiment_id"]
    refused = {
        "read run": lab.server.request(f"/api/2.0/mlflow/runs/get?run_id={run_id}", bob),
        "list artifacts": lab.server.request(f"/api/2.0/mlflow/artifacts/list?run_id={run_id}", bob),
        "download artifact": lab.server.request(f"/get-artifact?path=report.md&run_uuid={run_id}", bob),
        "create run": lab.server.request("/api/2.0/mlflow/runs/create", bob, {"experiment_id": exp_id}),
        "log metric": lab.server.request(
            "/api/2.0/mlflow/runs/log-metric",
            bob,
            {"run_id": run_id, "key": "tampered", "value": 1.0, "timestamp": 0, "step": 0},
        ),
        "set tag": lab.server.request(
            "/api/2.0/mlflow/runs/set-tag", bob, {"run_id": run_id, "key": "fewscan.stage", "value": "x"}
        ),
        "read model": lab.server.request(
            "/api/2.0/mlflow/registered-models/get?name=fewscan-lab_alice-meta", bob
        ),
    }
    assert {k: c for k, (c, _) in refused.items()} == {k: 403 for k in refused}, refused
    # searches answer as if the experiment were empty, and it does not even show up in bob's list
    code, text = lab.server.request(
        "/api/2.0/mlflow/runs/search", bob, {"experiment_ids": [exp_id], "max_results": 10}
    )
    assert code == 200 and json.loads(text).get("runs", []) == [], text[:500]
    code, text = lab.server.request("/api/2.0/mlflow/experiments/search?max_results=1000", bob)
    assert code == 200 and "fewscan/lab_alice" not in text
    # and nothing changed: alice's run has no metric or tag from bob
    with _as_user(lab, "bob"), pytest.raises(MlflowException, match="Permission denied"):
        MlflowClient(tracking_uri=lab.server.url).get_run(run_id)
    code, text = lab.server.request(f"/api/2.0/mlflow/runs/get?run_id={run_id}", lab.auth("alice"))
    data = json.loads(text)["run"]["data"]
    assert "tampered" not in json.dumps(data.get("metrics", [])) and code == 200
    assert {t["key"]: t["value"] for t in data["tags"]}["fewscan.stage"] == "evaluate"

    # bob naming alice's run by id in a fewscan command: one clear line, no traceback, non-zero exit
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "episodes", "demo_quick", "--from", alice_chain["ingest"]],
        cwd=tmp_path,
        env={**lab.env("bob", tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "ermission" in res.stderr and alice_chain["ingest"] in res.stderr, res.stderr[-3000:]


def test_two_users_chains_at_once_lose_nothing(
    lab: Lab, alice_chain: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    folders = {u: tmp_path_factory.mktemp(f"{u}-concurrent") for u in ("alice", "bob")}
    suites = {"alice": "lab_alice_2", "bob": "lab_bob"}
    procs = {u: (_start_chain(lab, u, suites[u], folders[u]), folders[u]) for u in suites}
    _wait_chains(procs)
    ids = {u: _check_chain(lab, u, suites[u]) for u in suites}
    assert not set(ids["alice"].values()) & set(ids["bob"].values())
    # alice's first chain is untouched: still exactly its five runs and their objects
    assert _check_chain(lab, "alice", "lab_alice") == alice_chain
