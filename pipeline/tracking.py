"""The one module that talks to MLflow.

Everything the stages record goes through here: stage runs with their tags, fingerprints for reuse,
upstream resolution, artifacts (local paths when the store is local, a download cache when it is a
server), the model registry, and a bounded retry around SQLite's single-writer lock. Stages are handed
a `StageRun` and `UpstreamRun`s and never import mlflow themselves (pipeline/serving.py, the pyfunc
class of an adapted model, is the one other place that must subclass an mlflow type).

We use `MlflowClient` with explicit run ids rather than the fluent API: an explicit run is what the
design asks for, and it keeps nested chain runs independent of process-global "active run" state.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import yaml
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow
from pipeline import __version__, codeset, ui_view
from pipeline.errors import TrackingError, UpstreamError
from pipeline.progress import log

T = TypeVar("T")

DEFAULT_DB = Path("mlflow") / "mlflow.db"
DEFAULT_ARTIFACTS = Path("mlflow") / "artifacts"
STAGE_NAMES = ("ingest", "episodes", "meta-train", "adapt", "evaluate")
TAG_STAGE = "fewscan.stage"
TAG_FINGERPRINT = "fewscan.fingerprint"
TAG_SUITE = "fewscan.suite"
TAG_DATASET = "fewscan.dataset"
TAG_CODE = "fewscan.code_version"
TAG_ERROR = "fewscan.error"
TAG_UPSTREAM = "fewscan.upstream."
TAG_NOTE = "mlflow.note.content"  # shown as the run's description in the UI
TAG_PARENT = "mlflow.parentRunId"
TAG_USER = "mlflow.user"  # MlflowClient.create_run takes the run's user_id from this tag
TAG_OWNER = "fewscan.owner"  # experiment tag: who created it (for people; the proof is what we check)
TAG_OWNER_PROOF = "fewscan.owner_proof."  # + key id: HMAC of (user, experiment id) with the owner key
# The lease of a RUNNING run (docs/scaling.md, "Killed runs"): who runs it and when it last said so.
TAG_HOST = "fewscan.host"
TAG_PID = "fewscan.pid"
TAG_HEARTBEAT = "fewscan.heartbeat"  # unix seconds, refreshed every HEARTBEAT_S while the run is open
HEARTBEAT_S = float(os.environ.get("FEWSCAN_HEARTBEAT_S", "60"))  # rare: SQLite has one writer
LEASE_TIMEOUT_S = float(os.environ.get("FEWSCAN_LEASE_TIMEOUT_S", "900"))
DEFAULT_ALIAS = "current"  # MLflow reserves the alias "latest"
RETRY_SECONDS = float(os.environ.get("FEWSCAN_DB_RETRY_S", "120"))
_MAX_PARAM_LEN = 6000


# --------------------------------------------------------------------------------------------- store
def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the local SQLite store under ./mlflow/."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{DEFAULT_DB.resolve()}"


def is_default_store() -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


def default_artifact_root() -> str:
    return DEFAULT_ARTIFACTS.resolve().as_uri()


_client: MlflowClient | None = None
_client_uri: str | None = None


def client() -> MlflowClient:
    """A client for the current tracking URI (re-created if the URI changed, e.g. in tests)."""
    global _client, _client_uri
    uri = tracking_uri()
    if _client is None or _client_uri != uri:
        if is_default_store():
            DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
            DEFAULT_ARTIFACTS.mkdir(parents=True, exist_ok=True)
        # Not mlflow.set_tracking_uri: it exports MLFLOW_TRACKING_URI into os.environ, which would make
        # the default store look like a user-chosen one to everything that runs later in this process.
        with _creation_lock(uri):
            made = retry(lambda: MlflowClient(tracking_uri=uri, registry_uri=uri), "open the tracking store")
            if uri.startswith("sqlite:"):
                # both stores create their schema on first use: do it now, while holding the lock
                retry(lambda: made.search_experiments(max_results=1), "create the tracking store")
                retry(lambda: made.search_registered_models(max_results=1), "create the model registry")
        _client, _client_uri = made, uri
        reap_dead_runs()  # every command that opens the store closes the runs of processes that are gone
    return _client


# --------------------------------------------------------------------------------------------- leases
# A process killed with SIGKILL (or a machine that lost power) cannot mark its run; it would stay RUNNING
# forever. Every open run therefore holds a lease: its host and pid, and a heartbeat tag refreshed by a
# daemon thread. A run is dead when its host is this one and its pid is gone, or when its heartbeat is
# older than LEASE_TIMEOUT_S (another host, or a reused pid); any command that opens the store marks dead
# runs KILLED, with the reason in `fewscan.error` (docs/scaling.md, "Killed runs").
def lease_tags() -> dict[str, str]:
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()), TAG_HEARTBEAT: str(int(time.time()))}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def lease_gone(tags: dict[str, str], now: float | None = None) -> str | None:
    """Why the process holding a run with these tags is gone, or None if it may still be alive (or the
    run has no lease: a run of an older fewscan, left alone)."""
    host, pid, beat = tags.get(TAG_HOST), tags.get(TAG_PID), tags.get(TAG_HEARTBEAT)
    if not (host and pid and beat):
        return None
    now = time.time() if now is None else now
    with contextlib.suppress(ValueError):
        if host == socket.gethostname() and not _pid_alive(int(pid)):
            return f"its process (pid {pid} on {host}) is gone: killed, or its machine restarted"
        age = now - float(beat)
        if age > LEASE_TIMEOUT_S:
            return (
                f"its process (pid {pid} on {host}) sent no heartbeat for {age / 60:.0f} min "
                f"(more than FEWSCAN_LEASE_TIMEOUT_S={LEASE_TIMEOUT_S:.0f} s)"
            )
    return None


def reap_dead_runs() -> list[str]:
    """Mark KILLED the RUNNING fewscan runs (of fewscan experiments; on a server, the user's own) whose
    lease is gone; their ids. A nicety of every command: a failure here is logged, never fatal (but a
    refused password is reported as such)."""
    try:
        c = client()
        exps = retry(
            lambda: c.search_experiments(filter_string="name LIKE 'fewscan/%'", max_results=1000),
            "list the experiments",
        )
        if not exps:
            return []
        ids = [str(e.experiment_id) for e in exps]
        runs = retry(
            lambda: c.search_runs(ids, _runs_filter(["attributes.status = 'RUNNING'"]), max_results=1000),
            "search running runs",
        )
        killed = []
        for run in runs:
            why = lease_gone(dict(run.data.tags))
            if why is None:
                continue
            rid = run.info.run_id
            msg = f"marked KILLED by a later fewscan command: {why}. Rerun or resume the stage."
            retry(lambda: c.set_tag(rid, TAG_ERROR, msg), "mark a dead run")  # noqa: B023
            retry(lambda: c.set_terminated(rid, "KILLED"), "mark a dead run")  # noqa: B023
            log(
                f"run {rid} ({run.data.tags.get(TAG_STAGE) or 'chain'}) was left RUNNING: {why}; marked KILLED"
            )
            killed.append(rid)
        return killed
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - see the docstring
        log(f"could not check for runs left RUNNING by killed processes ({type(err).__name__}: {err})")
        return []


class _Heartbeat:
    """Refreshes a run's heartbeat tag every HEARTBEAT_S from a daemon thread until stopped."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"fewscan-heartbeat-{run_id[:8]}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat only shortens the lease
                retry(
                    lambda: client().set_tag(self.run_id, TAG_HEARTBEAT, str(int(time.time()))),
                    "refresh the run's heartbeat",
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """For a SQLite store, an exclusive lock on a file beside the database while the store is opened:
    MLflow creates the schema of an empty database on first use, and two processes doing that at once
    make one of them fail inside the schema creation, where "database is locked" retries do not reach
    (docs/scaling.md, "Killed runs"). Other stores: nothing."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        yield
        return
    import fcntl

    db = Path(unquote(uri[len("sqlite:///") :].split("?", 1)[0]))  # sqlite:///rel.db, sqlite:////abs.db
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.parent / f".{db.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _is_lock_error(err: BaseException) -> bool:
    text = f"{err!r} {err}".lower()
    return (
        "database is locked" in text
        or "database table is locked" in text
        or "busy" in text
        and "sqlite" in text
    )


def _is_auth_error(err: BaseException) -> bool:
    """A tracking server's 401: a missing or wrong user/password (from MLflow's REST client or a download)."""
    if isinstance(err, MlflowException):
        with contextlib.suppress(Exception):
            if err.get_http_status_code() == 401:
                return True
    text = str(err)
    return "401" in text and ("Unauthorized" in text or "UNAUTHENTICATED" in text or "authenticat" in text)


def _http_status(err: MlflowException) -> int | None:
    with contextlib.suppress(Exception):
        return int(err.get_http_status_code())
    return None


def _auth_message() -> str:
    who = os.environ.get("MLFLOW_TRACKING_USERNAME")
    problem = f"refused the password of user '{who}'" if who else "asks for a user and password"
    return (
        f"the tracking server {tracking_uri()} {problem} (HTTP 401). Set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to your account on that server (docs/scaling.md)."
    )


def retry(fn: Callable[[], T], what: str) -> T:
    """Call `fn`, retrying while SQLite reports its single-writer lock, for at most RETRY_SECONDS.

    Two fewscan commands on one SQLite store take turns instead of one of them losing its run.
    """
    deadline = time.monotonic() + RETRY_SECONDS
    delay = 0.05
    jitter = random.Random()  # local instance: jitter only, never data randomness
    warned = False
    while True:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - filtered just below
            if _is_auth_error(err):
                raise TrackingError(_auth_message()) from None
            if not _is_lock_error(err):
                raise
            if time.monotonic() >= deadline:
                raise TrackingError(
                    f"the MLflow store {tracking_uri()} stayed locked for {RETRY_SECONDS:.0f} s while trying to "
                    f"{what}: another process keeps writing to it. Wait for it to finish and retry, raise "
                    "FEWSCAN_DB_RETRY_S, or use a tracking server (`mlflow server`) for concurrent work."
                ) from err
            if not warned:
                log(
                    f"MLflow store is busy (another writer); retrying to {what} for up to {RETRY_SECONDS:.0f} s"
                )
                warned = True
            time.sleep(delay * (0.5 + jitter.random()))
            delay = min(delay * 2, 2.0)


# ------------------------------------------------------------------------------- whose runs
# On a shared tracking server other people can create experiments and runs, and (with edit rights they
# grant) make them visible and writable to you. fewscan therefore consumes, reuses and resumes only
# runs of the suite's own experiment(s) (`search_scope`) and, on a server with a user, only runs of
# experiments that user created and only runs that user created (docs/scaling.md, "Whose runs fewscan
# uses"). A run named by id (--from, --resume RUN_ID, --model) is the user's explicit choice and is used
# wherever it lives.
#
# What MLflow 3.17's basic-auth server does and does not vouch for:
# - a run's user_id is whatever the client sends in CreateRun (MlflowClient takes it from the tag
#   `mlflow.user`); the server does not set it to the authenticated user, so anyone who may create
#   runs in an experiment can create runs "by alice";
# - the creator of an experiment gets MANAGE on it, but nothing records who created it, and a MANAGE
#   holder may grant MANAGE to anyone: "I can manage it" does not mean "I created it".
# So the user_id filter only separates your runs from those of people you yourself let write into your
# experiment, and the experiment's owner is proven with a secret only the owner has: when fewscan
# creates an experiment it tags it with an HMAC of (user, experiment id) under a random key kept in
# the user's own key file (`owner_key_file`). Another user can copy the tag but not compute it for
# his experiment's id, and the key is no password (the tag gives nothing to guess a password from).
def server_user() -> str | None:
    """The tracking user when the store is an http(s) server with a basic-auth user, else None."""
    if not tracking_uri().startswith(("http://", "https://")):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or None
    if user and ("'" in user or "\\" in user):
        raise TrackingError(
            f"MLFLOW_TRACKING_USERNAME {user!r} contains a quote or a backslash; fewscan selects runs by "
            "their user and cannot quote such a name in an MLflow search. Use a user name without them."
        )
    return user


def owner_key_file() -> Path:
    env = os.environ.get("FEWSCAN_OWNER_KEY_FILE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "fewscan" / "owner.key"


def _owner_key() -> bytes:
    """This user's secret owner key, created (mode 0600) on first use."""
    path = owner_key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):  # another process may create it at the same time
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    if path.stat().st_mode & 0o077:
        raise TrackingError(
            f"the fewscan owner key {path} can be read by other users; `chmod 600 {path}` (whoever read it "
            "can pass off experiments as yours: delete it instead if others may have copied it)"
        )
    key = path.read_text().strip()
    if len(key) < 32:
        raise TrackingError(
            f"the fewscan owner key {path} is damaged (too short); delete it to make a new one"
        )
    return key.encode()


def _owner_proof(key: bytes, user: str, exp_id: str) -> tuple[str, str]:
    """(tag key, tag value) proving that `user`, holding `key`, created experiment `exp_id`."""
    key_id = hashlib.sha256(b"fewscan-owner-key-id\0" + key).hexdigest()[:12]
    msg = f"fewscan-experiment-owner/1\0{user}\0{exp_id}".encode()
    return TAG_OWNER_PROOF + key_id, hmac.new(key, msg, hashlib.sha256).hexdigest()


def _sign_experiment(exp_id: str, user: str) -> None:
    tag, proof = _owner_proof(_owner_key(), user, exp_id)
    c = client()
    retry(lambda: c.set_experiment_tag(exp_id, TAG_OWNER, user), "tag the experiment's owner")
    retry(lambda: c.set_experiment_tag(exp_id, tag, proof), "tag the experiment's owner")


def _claimed(name: str) -> bool:
    claims = os.environ.get("FEWSCAN_CLAIM_EXPERIMENT", "")
    return name in [c.strip() for c in claims.split(",")]


def _is_owned(exp: Any, user: str) -> bool:
    """Whether `user` created experiment `exp` with fewscan (or claims it now with FEWSCAN_CLAIM_EXPERIMENT)."""
    tag, proof = _owner_proof(_owner_key(), user, str(exp.experiment_id))
    if hmac.compare_digest(str(exp.tags.get(tag, "")), proof):
        return True
    if _claimed(exp.name):
        _sign_experiment(str(exp.experiment_id), user)
        log(f"claimed experiment '{exp.name}' as {user}'s (FEWSCAN_CLAIM_EXPERIMENT); unset it now")
        return True
    return False


def _not_owned_message(name: str, user: str) -> str:
    return (
        f"experiment '{name}' on {tracking_uri()} was not created by you ({user}) with fewscan, so fewscan "
        "neither writes into it nor uses its runs: whoever created it and gave you access could have planted "
        "runs in it. Give your suite another name (`name:` in the suite file). If the experiment is yours "
        f"(made before fewscan recorded owners, or on another machine: copying {owner_key_file()} from there "
        f"also works), check its runs in the UI and claim it once with FEWSCAN_CLAIM_EXPERIMENT='{name}'."
    )


def search_scope(stage: str, suite: str | None, dataset: str | None) -> list[str]:
    """Ids of the experiments in which a `stage` run for this suite/dataset may be found: the one its
    runs are written to (`fewscan/<suite>`, or `fewscan/dataset-<name>` without a suite) and, for ingest,
    also the dataset's (a standalone `fewscan ingest`). Missing experiments are left out, and on a server
    so are experiments the user did not create (with a log line saying so)."""
    names = [experiment_name(suite, dataset)] if suite or dataset else []
    if stage == "ingest" and dataset:
        names.append(experiment_name(None, dataset))
    c = client()
    user = server_user()
    ids: list[str] = []
    for name in dict.fromkeys(names):
        exp = retry(partial(c.get_experiment_by_name, name), "look up an experiment")
        if exp is None or exp.lifecycle_stage == "deleted":
            continue
        if user and not _is_owned(exp, user):
            log(f"not searching experiment '{name}': {_not_owned_message(name, user)}")
            continue
        ids.append(str(exp.experiment_id))
    return ids


def _runs_filter(clauses: Iterable[str]) -> str:
    """A search filter of `clauses`, restricted on a server to the runs the current user created."""
    out = list(clauses)
    user = server_user()
    if user:
        out.append(f"attributes.user_id = '{user}'")
    return " and ".join(out)


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created if missing. On a server with a user it must be one that user
    created (see "whose runs" above): refused otherwise, with the fix in the message."""
    c = client()
    user = server_user()
    exp = retry(lambda: c.get_experiment_by_name(name), "look up an experiment")
    if exp is None:
        location = default_artifact_root() if is_default_store() else None
        try:
            new_id = str(
                retry(lambda: c.create_experiment(name, artifact_location=location), "create an experiment")
            )
        except MlflowException:
            # another process created it between our lookup and create; if it is ours, its tag follows
            exp = retry(lambda: c.get_experiment_by_name(name), "look up an experiment")
            if exp is None:
                raise
            for _ in range(20 if user else 0):
                if any(k.startswith(TAG_OWNER_PROOF) for k in exp.tags):
                    break
                time.sleep(0.5)
                exp = retry(lambda: c.get_experiment_by_name(name), "look up an experiment") or exp
        else:
            if user:
                _sign_experiment(new_id, user)
            present_experiment(new_id)  # a model-training experiment, not GenAI (pipeline/ui_view.py)
            return new_id
    if user and not _is_owned(exp, user):
        raise TrackingError(_not_owned_message(name, user))
    found_id = str(exp.experiment_id)
    if exp.lifecycle_stage == "deleted":
        retry(lambda: c.restore_experiment(found_id), "restore a deleted experiment")
    if exp.tags.get(ui_view.TAG_KIND) != ui_view.KIND:  # made by an older fewscan
        present_experiment(found_id)
    return found_id


def experiment_name(suite: str | None, dataset: str | None) -> str:
    return f"fewscan/{suite}" if suite else f"fewscan/dataset-{dataset}"


def ui_base() -> str:
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return "http://127.0.0.1:5000"


def run_url(experiment: str, run_id: str) -> str:
    """A run's page in the UI's model-training view (pipeline/ui_view.py)."""
    return f"{ui_base()}/{ui_view.run_path(experiment, run_id)}"


def experiment_url(experiment: str, base: str | None = None) -> str:
    """An experiment's run table with fewscan's key-metric columns, in the model-training view."""
    return f"{(base or ui_base()).rstrip('/')}/{ui_view.runs_path(experiment)}"


def ui_lines(base: str) -> list[str]:
    """Where a researcher opens the UI served at `base`: each fewscan experiment's run table in the
    model-training view (without `workflowType` in the URL, MLflow 3.17 opens in its GenAI view)."""
    try:
        exps = list(client().search_experiments(filter_string="name LIKE 'fewscan/%'", max_results=100))
    except Exception:  # noqa: BLE001 - the links are a convenience; the UI starts without them
        exps = []
    lines = [
        f"  {e.name}: {experiment_url(str(e.experiment_id), base)}"
        for e in sorted(exps, key=lambda e: e.name)
    ]
    return lines or [f"  all experiments: {base.rstrip('/')}/#/experiments?{ui_view.WORKFLOW}"]


def present_experiment(exp_id: str, description: str | None = None) -> None:
    """Tag experiment `exp_id` as model training (earlier MLflow 3 UIs open it in that view; 3.17 follows
    the URL, pipeline/ui_view.py) and set its description when given; unchanged tags are not rewritten."""
    c = client()
    exp = retry(lambda: c.get_experiment(exp_id), "read an experiment")
    want = {ui_view.TAG_KIND: ui_view.KIND}
    if description is not None:
        want[TAG_NOTE] = description
    for k, v in want.items():
        if exp.tags.get(k) != v:
            set_experiment_tag(exp_id, k, v, "describe the experiment")


def set_experiment_tag(exp_id: str, key: str, value: str, what: str) -> None:
    """Set an experiment tag. Two commands that write a tag the experiment does not have yet (two chains
    opening a fresh experiment, or finishing their first stages, together) both insert it, and the
    database refuses the second insert (UNIQUE constraint, an MlflowException). The tag exists then, and
    writing it again updates it."""
    c = client()
    try:
        retry(partial(c.set_experiment_tag, exp_id, key, value), what)
    except MlflowException:
        if key not in retry(lambda: c.get_experiment(exp_id), what).tags:
            raise
        retry(partial(c.set_experiment_tag, exp_id, key, value), what)


def lineage(upstream: dict[str, UpstreamRun]) -> list[ui_view.Link]:
    """The upstream runs of a stage and theirs, back to ingest, nearest first (each stage once)."""
    out: list[ui_view.Link] = []
    todo = list(upstream.values())
    seen: set[str] = set()
    while todo:
        up = todo.pop(0)
        if up.run_id in seen:
            continue
        seen.add(up.run_id)
        out.append(ui_view.Link(up.stage, up.tags.get("mlflow.runName", ""), up.experiment_id, up.run_id))
        for key, rid in sorted(up.tags.items()):
            if key.startswith(TAG_UPSTREAM) and rid not in seen:
                with contextlib.suppress(UpstreamError):  # a deleted upstream run: the link is left out
                    todo.append(UpstreamRun.from_id(rid, expect_stage=key[len(TAG_UPSTREAM) :]))
    return out


# ----------------------------------------------------------------------------------- fingerprints
TAG_NUMERICS = "fewscan.numerics"  # JSON of `numerics(stage)`, for stages that run the engine


def code_files(stage: str) -> tuple[str, ...]:
    """The package files (relative to pipeline/) the stage can execute, derived from its imports: editing
    evaluate must not invalidate a finished ingest, and editing a C kernel must rerun meta-train
    (pipeline/codeset.py)."""
    from pipeline.stages import MODULES  # stages imports this module

    return codeset.code_files(MODULES[stage]) if stage in MODULES else ()


def code_version(stage: str) -> str:
    """Hash of the stage's code set, paths and bytes (works without git, sees uncommitted edits)."""
    h = hashlib.sha256()
    for rel in code_files(stage):
        h.update(rel.encode() + b"\0")
        h.update((codeset.ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def numerics(stage: str, device: str = "auto") -> dict[str, str] | None:
    """Torch version, device type and CPU kernel build the stage computes with; None if it runs no engine."""
    return codeset.numerics(code_files(stage), device)


def fingerprint(
    stage: str,
    config: dict[str, Any],
    upstream_ids: dict[str, str],
    inputs: Any = None,
    *,
    device: str = "auto",
) -> str:
    """Hash of what a stage's result depends on: config, upstream runs, inputs, code set and numerics.
    `device` is the stage's `device` setting (auto / cpu / cuda[:N]) where it has one."""
    payload = {
        "stage": stage,
        "config": config,
        "upstream": dict(sorted(upstream_ids.items())),
        "code": code_version(stage),
        "numerics": numerics(stage, device),
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------- artifacts
def _local_artifact_dir(artifact_uri: str) -> Path | None:
    """The run's artifact folder on this machine, or None if it lives behind a server."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_uri:
        return Path(artifact_uri)
    return None


def _cache_root() -> Path:
    return Path(os.environ.get("FEWSCAN_CACHE", ".fewscan/cache")).resolve()


def _artifact_path(run_id: str, artifact_uri: str, rel: str) -> Path:
    local = _local_artifact_dir(artifact_uri)
    if local is not None:
        p = local / rel
        if not p.exists():
            raise UpstreamError(f"run {run_id} has no artifact '{rel}' (looked in {local})")
        return p
    dest = _cache_root() / run_id
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
        os.replace(got, target)  # a finished download appears at once, never half-written
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


@dataclass
class UpstreamRun:
    """A finished run that a stage consumes."""

    run_id: str
    stage: str
    params: dict[str, str]
    tags: dict[str, str]
    artifact_uri: str
    experiment_id: str = ""

    @classmethod
    def from_id(cls, run_id: str, expect_stage: str | None = None) -> UpstreamRun:
        c = client()
        try:
            run = retry(lambda: c.get_run(run_id), f"read run {run_id}")
        except MlflowException as err:
            if _http_status(err) == 403:  # basic auth: the run exists, its experiment is not shared with you
                who = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
                raise UpstreamError(
                    f"user '{who}' has no permission to read run '{run_id}' on {tracking_uri()} (HTTP 403). "
                    "Ask the owner of its experiment to grant you READ on it (docs/scaling.md, 'For a lab'), "
                    "or use a run of your own."
                ) from None
            raise UpstreamError(
                f"no MLflow run with id '{run_id}' in {tracking_uri()}. Check the id in the MLflow UI "
                "(`fewscan ui`) or set MLFLOW_TRACKING_URI to the store that holds it."
            ) from None
        stage = run.data.tags.get(TAG_STAGE, "")
        if expect_stage and stage != expect_stage:
            raise UpstreamError(
                f"run {run_id} is a '{stage or 'non-fewscan'}' run, but a '{expect_stage}' run is needed here"
            )
        if run.info.status != "FINISHED":
            raise UpstreamError(
                f"{stage} run {run_id} is {run.info.status}, not FINISHED; rerun that stage (or resume it) first"
            )
        return cls(
            run_id=run_id,
            stage=stage,
            params=dict(run.data.params),
            tags=dict(run.data.tags),
            artifact_uri=run.info.artifact_uri,
            experiment_id=run.info.experiment_id,
        )

    def artifact(self, rel: str) -> Path:
        """Local path of one of the run's artifacts (a file or a folder)."""
        return _artifact_path(self.run_id, self.artifact_uri, rel)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.artifact(rel).read_text())

    def upstream(self, stage: str) -> UpstreamRun:
        rid = self.tags.get(TAG_UPSTREAM + stage)
        if not rid:
            raise UpstreamError(f"{self.stage} run {self.run_id} records no upstream '{stage}' run")
        return UpstreamRun.from_id(rid, expect_stage=stage)


def latest_run(stage: str, *, suite: str | None = None, dataset: str | None = None) -> UpstreamRun:
    """The most recent FINISHED run of `stage` for a suite (or, for ingest, a dataset), in the suite's
    own experiments only (`search_scope`; for ingest, `suite` only widens the scope to the suite's
    experiment) and, on a server, among the current user's runs only."""
    c = client()
    filt = [f"tags.`{TAG_STAGE}` = '{stage}'", "attributes.status = 'FINISHED'"]
    if suite and stage != "ingest":
        filt.append(f"tags.`{TAG_SUITE}` = '{suite}'")
    if dataset:
        filt.append(f"tags.`{TAG_DATASET}` = '{dataset}'")
    exps = search_scope(stage, suite, dataset)
    runs = (
        retry(
            lambda: c.search_runs(
                exps, _runs_filter(filt), order_by=["attributes.start_time DESC"], max_results=1
            ),
            f"search {stage} runs",
        )
        if exps
        else []
    )
    if not runs:
        which = f"suite '{suite}'" if suite and stage != "ingest" else f"dataset '{dataset}'"
        raise UpstreamError(
            f"no finished '{stage}' run for {which} in {tracking_uri()}. Run `fewscan {stage} ...` first, "
            "or pass --from RUN_ID."
        )
    return UpstreamRun.from_id(runs[0].info.run_id, expect_stage=stage)


def resolve_upstream(
    stage: str, run_id: str | None, *, suite: str | None, dataset: str | None
) -> UpstreamRun:
    if run_id:  # named explicitly: used wherever it lives
        return UpstreamRun.from_id(run_id, expect_stage=stage)
    return latest_run(stage, suite=suite, dataset=dataset if stage == "ingest" else None)


def find_reusable(stage: str, fp: str, *, suite: str | None, dataset: str | None) -> str | None:
    """A FINISHED run of `stage` with this fingerprint in the suite's own experiments (`search_scope`)
    and, on a server, created by the current user: a fingerprint is only a hash of tags anyone can set."""
    c = client()
    exps = search_scope(stage, suite, dataset)
    if not exps:
        return None
    filt = _runs_filter(
        [
            f"tags.`{TAG_FINGERPRINT}` = '{fp}'",
            f"tags.`{TAG_STAGE}` = '{stage}'",
            "attributes.status = 'FINISHED'",
        ]
    )
    runs = retry(
        lambda: c.search_runs(exps, filt, order_by=["attributes.start_time DESC"], max_results=1),
        "search runs",
    )
    return runs[0].info.run_id if runs else None


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_model_ref(ref: str) -> str:
    """A meta-train run id from a run id, `models:/name@alias`, `models:/name/3`, `name@alias` or `runs:/id/...`."""
    c = client()
    ref = ref.strip()
    if _RUN_ID.match(ref):
        return ref
    if ref.startswith("runs:/"):
        return ref[len("runs:/") :].split("/")[0]
    body = ref[len("models:/") :] if ref.startswith("models:/") else ref
    try:
        if "@" in body and body.split("@", 1)[1].lower() != "latest":
            name, alias = body.split("@", 1)
            mv = retry(lambda: c.get_model_version_by_alias(name, alias), "read the model registry")
        elif "@" in body or body.endswith("/latest"):
            name = body.split("@", 1)[0] if "@" in body else body[: -len("/latest")]
            versions = retry(lambda: c.search_model_versions(f"name = '{name}'"), "read the model registry")
            if not versions:
                raise MlflowException(f"no versions of '{name}'")
            mv = max(versions, key=lambda v: int(v.version))
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            mv = retry(lambda: c.get_model_version(name, version), "read the model registry")
        else:
            versions = retry(lambda: c.search_model_versions(f"name = '{body}'"), "read the model registry")
            if not versions:
                raise MlflowException(f"no versions of '{body}'")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException:
        raise UpstreamError(
            f"model '{ref}' was not found in the registry of {tracking_uri()}. Give a meta-train run id, "
            "'models:/NAME@ALIAS', 'NAME@ALIAS' or 'models:/NAME/VERSION' (see the Models tab of `fewscan ui`)."
        ) from None
    if not mv.run_id:
        raise UpstreamError(f"registered model '{ref}' has no source run")
    return str(mv.run_id)


# ------------------------------------------------------------------------------------- stage runs
@dataclass
class StageResult:
    """What a stage returns: its one-line summary and a few headline metrics."""

    summary: str
    metrics: dict[str, float] = field(default_factory=dict)


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if isinstance(d, (list, tuple)):
        s = json.dumps(d, default=str)
    else:
        s = str(d)
    out[key] = s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."
    return out


class StageRun:
    """An open MLflow run of one stage. Stages write files into `outdir`; they are uploaded at the end."""

    def __init__(
        self,
        run_id: str,
        stage: str,
        experiment_id: str,
        outdir: Path,
        artifact_uri: str,
        resumed: bool,
        suite: str | None = None,
    ):
        self.run_id = run_id
        self.stage = stage
        self.experiment_id = experiment_id
        self.outdir = outdir
        self.artifact_uri = artifact_uri
        self.resumed = resumed
        self.suite = suite  # the suite the run is filed under (names its registered models)
        self.ui_url = run_url(experiment_id, run_id)
        # (name, alias, version) set by `stage_run` once the run is FINISHED (see `register_model`)
        self.pending_aliases: list[tuple[str, str, str]] = []

    # -- values
    def log_params(self, d: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(d)
        items = [Param(k, v) for k, v in flat.items()]
        c = client()
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            try:
                retry(partial(c.log_batch, self.run_id, params=chunk), "log params")
            except MlflowException as err:
                # a resumed run may re-log identical params; a *changed* value is a real error
                if "already logged" not in str(err) and "Changing param values" not in str(err):
                    raise

    def log_metrics(self, d: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in d.items() if v is not None]
        c = client()
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            retry(partial(c.log_batch, self.run_id, metrics=chunk), "log metrics")

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def set_tags(self, d: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)[:5000]) for k, v in d.items()]
        retry(lambda: client().log_batch(self.run_id, tags=tags), "set tags")

    def set_description(self, text: str) -> None:
        self.set_tags({TAG_NOTE: text})

    def describe(self, summary: str, upstream: dict[str, UpstreamRun]) -> None:
        """The run's description in the UI: `summary`, links to its upstream runs back to ingest and, for
        a run that wrote `report.md` (evaluate), its first plots and as much of the report as fits."""
        report = self.outdir / "report.md"
        plots = sorted(p.relative_to(self.outdir).as_posix() for p in self.outdir.glob("plots/*.png"))
        if report.is_file():  # the plots in the order the report lists them
            text = report.read_text()
            plots.sort(key=lambda p: (text.find(p) if p in text else len(text), p))
        self.set_tags(
            {
                TAG_NOTE: ui_view.stage_description(
                    summary,
                    self.experiment_id,
                    self.run_id,
                    lineage(upstream),
                    report=report.read_text() if report.is_file() else None,
                    plots=ui_view.write_previews(self.outdir, plots[: ui_view.MAX_PLOTS]),
                )
            }
        )

    def publish_view(self) -> None:
        """Add this run's key metrics to the columns of its experiment's shared run-table view."""
        c = client()
        run = retry(lambda: c.get_run(self.run_id), "read the run")
        exp = retry(lambda: c.get_experiment(self.experiment_id), "read the experiment")
        state = ui_view.view_state(exp.tags.get(ui_view.TAG_VIEW), run.data.metrics)
        if state != exp.tags.get(ui_view.TAG_VIEW):
            set_experiment_tag(self.experiment_id, ui_view.TAG_VIEW, state, "set the run view")

    # -- files
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(local_path)
        c = client()
        if p.is_dir():
            retry(lambda: c.log_artifacts(self.run_id, str(p), artifact_path), f"upload {p.name}")
        else:
            retry(lambda: c.log_artifact(self.run_id, str(p), artifact_path), f"upload {p.name}")

    def log_state_dict(self, state_dict: dict[str, Any], artifact_path: str) -> None:
        """Save a state dict the way `mlflow.pytorch.log_state_dict` does (loadable with load_state_dict)."""
        import mlflow.pytorch

        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pytorch.save_state_dict(state_dict, tmp)
            self.log_artifact(tmp, artifact_path)

    def own_artifact(self, rel: str) -> Path | None:
        """An artifact this run already uploaded (used to resume), or None."""
        try:
            return _artifact_path(self.run_id, self.artifact_uri, rel)
        except UpstreamError:
            return None

    def log_dataset(self, df: Any, name: str, digest: str, context: str, source: str | None = None) -> None:
        """Record a (PHI-free) table as an MLflow dataset input with a content digest."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import Dataset, DatasetInput, InputTag

        # The source names where the table lives: this run's artifact (e.g. store/scan_index.parquet).
        uri = f"{self.artifact_uri.rstrip('/')}/{source}" if source else ""
        # MLflow infers the table's schema by visiting every cell in Python (18 s of CPU for the three
        # pool tables of a 112k-scan index): it is inferred from one row when that row has the schema of
        # the whole table, and the profile (row and cell counts) is the whole table's.
        sample = _schema_sample(df)
        try:
            if not uri:
                raise MlflowException("no artifact source given")
            ds = from_pandas(sample, source=_dataset_source(uri), name=name, digest=digest)
        except MlflowException:
            src = CodeDatasetSource({"fewscan.run_id": self.run_id, "fewscan.artifact": source or ""})
            ds = from_pandas(sample, source=src, name=name, digest=digest)
        d = ds.to_dict()
        dataset = Dataset(
            name=d["name"],
            digest=d["digest"],
            source_type=d["source_type"],
            source=d["source"],
            schema=d.get("schema"),
            profile=json.dumps({"num_rows": len(df), "num_elements": int(df.size)}),
        )
        entity = DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", context)])
        retry(lambda: client().log_inputs(self.run_id, datasets=[entity]), "log dataset input")

    # -- models
    def log_pyfunc(
        self,
        artifact_path: str,
        python_model: Path,
        artifacts: dict[str, str] | None = None,
        input_example: Any = None,
        signature: Any = None,
        pip_requirements: list[str] | None = None,
    ) -> str:
        """Save an MLflow pyfunc model into this run's artifacts; returns its `runs:/` URI.

        `python_model`: the path of the model's code file (a model from code). Never a model object: MLflow
        would cloudpickle it, and loading a pickle runs code (docs/CONTRACTS.md, "Adapted model")."""
        import mlflow.pyfunc

        if not isinstance(python_model, (str, Path)):
            raise TypeError("log_pyfunc takes the path of a model's code file, not an object to pickle")
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                str(target),
                python_model=python_model,
                artifacts=artifacts,
                input_example=input_example,
                signature=signature,
                pip_requirements=pip_requirements,
            )
            self.log_artifact(target, artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}"

    def register_model(self, artifact_path: str, name: str, alias: str = "current") -> str:
        """Register `runs:/<this run>/<artifact_path>` as a new version of `name`; `alias` moves to it when
        the run ends FINISHED (`stage_run`), never before: a run that fails or is killed after registering
        leaves the alias where it was (docs/adapt.md, "Registered name")."""
        c = client()
        with contextlib.suppress(MlflowException):
            retry(lambda: c.create_registered_model(name), "create a registered model")
        source = f"{self.artifact_uri.rstrip('/')}/{artifact_path}"
        mv = retry(
            lambda: c.create_model_version(name, source, run_id=self.run_id, tags={TAG_STAGE: self.stage}),
            "register a model version",
        )
        if alias.lower() == "latest":
            # MLflow reserves "latest": models:/NAME/latest already names the newest version.
            alias = DEFAULT_ALIAS
        self.pending_aliases.append((name, alias, str(mv.version)))
        log(f"registered {name} version {mv.version} (alias '{alias}' moves to it when the run finishes)")
        return str(mv.version)


def _move_aliases(sr: StageRun) -> None:
    """Point the aliases the run asked for at its versions; called once the run is FINISHED. A failure here
    leaves the run FINISHED and says which alias did not move."""
    for name, alias, version in sr.pending_aliases:
        try:
            retry(lambda: client().set_registered_model_alias(name, alias, version), "set a model alias")  # noqa: B023
        except MlflowException as err:
            raise TrackingError(
                f"{sr.stage} run {sr.run_id} FINISHED and registered {name} version {version}, but the alias "
                f"'{alias}' could not be moved to it ({err}). Set it in the Models tab of `fewscan ui`, or "
                f"use models:/{name}/{version}."
            ) from None
        log(f"{name}@{alias} -> version {version} (also models:/{name}/latest)")


def _schema_sample(df: Any) -> Any:
    """`df`'s first row when every column has one type and no missing value (then MLflow infers the same
    schema from that row as from the whole table); else `df` itself."""
    import pandas as pd

    if len(df) <= 1:
        return df
    for col in df.columns:
        values = df[col]
        if values.isna().any():  # MLflow marks a column with missing values as not required
            return df
        if values.dtype.kind == "O" and pd.api.types.infer_dtype(values, skipna=False) != "string":
            return df  # objects of other or mixed types: MLflow looks at each one
    return df.iloc[:1]


def _dataset_source(uri: str) -> Any:
    """The dataset source for an artifact URI, resolved by one source class.

    MLflow registers its local-artifact source twice (for the schemes "" and "file"), so resolving a plain
    path through its registry matches two identical classes and warns "can be interpreted in multiple
    ways" on every stage. The first class that can resolve the URI is the answer either way."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source

    # the last registered source takes precedence in MLflow's own resolution: keep that order
    for source in reversed(get_registered_sources()):
        if source._can_resolve(uri):
            return resolve_dataset_source(uri, candidate_sources=[source])
    raise MlflowException(f"no dataset source resolves {uri}")


def stage_tags(
    stage: str,
    *,
    fp: str,
    upstream: dict[str, UpstreamRun],
    suite: str | None,
    dataset: str | None,
    parent_run_id: str | None,
) -> dict[str, str]:
    """The tags a new stage run is created with: stage, fingerprint, code, suite, upstream links, parent,
    user (on a server) and the lease."""
    tags: dict[str, str] = {
        TAG_STAGE: stage,
        TAG_FINGERPRINT: fp,
        TAG_CODE: code_version(stage),
        "fewscan.version": __version__,
    }
    if suite:
        tags[TAG_SUITE] = suite
    if dataset:
        tags[TAG_DATASET] = dataset
    for name, up in upstream.items():
        tags[TAG_UPSTREAM + name] = up.run_id
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    user = server_user()
    if user:
        tags[TAG_USER] = user  # the run's user_id, which the searches filter on
    tags.update(lease_tags())
    return tags


def create_stage_run(tags: dict[str, str], run_name: str, suite: str | None, dataset: str | None) -> Any:
    """Create a RUNNING run with `tags` in the suite's own experiment (created if missing)."""
    c = client()
    exp_id = experiment_id(experiment_name(suite, dataset))
    return retry(lambda: c.create_run(exp_id, tags=tags, run_name=run_name), "create a run")


def running_with_fingerprint(stage: str, fp: str, *, suite: str | None, dataset: str | None) -> list[Any]:
    """The RUNNING runs of `stage` with this fingerprint whose process is alive (a lease that is not gone;
    a run without a lease, of an older fewscan, never counts), in the scope and of the owner
    `find_reusable` accepts: the runs computing what a reuse would find (pipeline/claims.py)."""
    c = client()
    exps = search_scope(stage, suite, dataset)
    if not exps:
        return []
    filt = _runs_filter(
        [
            f"tags.`{TAG_FINGERPRINT}` = '{fp}'",
            f"tags.`{TAG_STAGE}` = '{stage}'",
            "attributes.status = 'RUNNING'",
        ]
    )
    runs = retry(lambda: c.search_runs(exps, filt, max_results=200), "search running runs")
    return [r for r in runs if TAG_HOST in r.data.tags and lease_gone(dict(r.data.tags)) is None]


def set_run_tag(run_id: str, key: str, value: str) -> None:
    retry(lambda: client().set_tag(run_id, key, value), "set a tag")


def withdraw_run(run_id: str, reason: str) -> None:
    """End a run that computed nothing (a claim that lost, pipeline/claims.py): KILLED with `reason` in
    `fewscan.error`, then deleted, so that neither `fewscan status` nor the UI shows it as a stage's run
    (`mlflow gc` removes it for good)."""
    c = client()
    retry(lambda: c.set_tag(run_id, TAG_ERROR, reason[:4900]), "withdraw a run")
    retry(lambda: c.set_terminated(run_id, "KILLED"), "withdraw a run")
    retry(lambda: c.delete_run(run_id), "withdraw a run")


def _start_system_metrics(run_id: str) -> Any:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(
            run_id, sampling_interval=10, samples_before_logging=1, tracking_uri=tracking_uri()
        )
        mon.start()
        return mon
    except Exception as err:  # noqa: BLE001 - system metrics are a nicety, never a reason to fail
        log(f"system metrics unavailable ({err}); continuing without them")
        return None


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    run_name: str,
    config: dict[str, Any],
    upstream: dict[str, UpstreamRun],
    fp: str,
    suite: str | None,
    dataset: str | None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    claimed_run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[StageRun]:
    """Open a stage run (or reattach to one to resume), yield it, and close it FINISHED/FAILED/KILLED.
    `claimed_run_id`: the run `claims.acquire` created (with `stage_tags`) and won, opened as a new run.

    On success everything under `run.outdir` is uploaded. On failure the error goes into the tag
    `fewscan.error` and the artifact `error.txt`, the run is marked FAILED, and the exception propagates.
    """
    c = client()
    tags = stage_tags(
        stage, fp=fp, upstream=upstream, suite=suite, dataset=dataset, parent_run_id=parent_run_id
    )

    if resume_run_id:
        run = retry(lambda: c.get_run(resume_run_id), "read the run to resume")
        if run.data.tags.get(TAG_STAGE) != stage:
            raise UpstreamError(f"run {resume_run_id} is not a {stage} run; cannot resume it as one")
        if run.info.status == "FINISHED":
            raise UpstreamError(f"{stage} run {resume_run_id} already FINISHED; nothing to resume")
        if run.info.status == "RUNNING" and TAG_HOST in run.data.tags and not lease_gone(run.data.tags):
            t = run.data.tags
            raise UpstreamError(
                f"{stage} run {resume_run_id} is still RUNNING (pid {t.get(TAG_PID)} on {t.get(TAG_HOST)}); "
                "wait for it or stop it before resuming"
            )
        # the lease first: a reopened run must never look RUNNING under its dead previous owner
        for k, v in lease_tags().items():
            retry(partial(c.set_tag, resume_run_id, k, v), "take the run's lease")
        retry(lambda: c.update_run(resume_run_id, status="RUNNING"), "reopen the run")
        run_id, resumed = resume_run_id, True
        artifact_uri = run.info.artifact_uri
    elif claimed_run_id:
        # created with these tags by the claim (pipeline/claims.py); its heartbeat restarts now
        run = retry(lambda: c.get_run(claimed_run_id), "read the claimed run")
        retry(partial(c.set_tag, claimed_run_id, TAG_HEARTBEAT, str(int(time.time()))), "take the lease")
        run_id, resumed = claimed_run_id, False
        artifact_uri = run.info.artifact_uri
    else:
        # a resume writes only into the run it was given; a new run goes into the suite's own experiment
        run = create_stage_run(tags, run_name, suite, dataset)
        run_id, resumed = run.info.run_id, False
        artifact_uri = run.info.artifact_uri

    outdir = Path(tempfile.mkdtemp(prefix=f"fewscan-{stage}-"))
    sr = StageRun(run_id, stage, run.info.experiment_id, outdir, artifact_uri, resumed, suite)
    monitor = _start_system_metrics(run_id) if system_metrics else None
    heartbeat = _Heartbeat(run_id)
    try:
        if not resumed:
            sr.log_params(config)
            cfg_dir = Path(tempfile.mkdtemp(prefix="fewscan-cfg-"))
            (cfg_dir / f"{stage}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            sr.log_artifact(cfg_dir / f"{stage}.yaml", "config")
            shutil.rmtree(cfg_dir, ignore_errors=True)
        yield sr
        if any(outdir.iterdir()):
            sr.log_artifact(outdir, None)
        retry(lambda: c.set_terminated(run_id, "FINISHED"), "finish the run")
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        for name, alias, version in sr.pending_aliases:
            log(
                f"{stage} run {status}: {name} version {version} stays registered; {name}@{alias} did not move"
            )
        msg = f"{type(err).__name__}: {err}"
        with contextlib.suppress(Exception):
            errfile = outdir / "error.txt"
            errfile.write_text(msg + "\n\n" + traceback.format_exc())
            sr.log_artifact(errfile, None)
            sr.set_tags({TAG_ERROR: msg[:4900]})
        with contextlib.suppress(Exception):
            retry(lambda: c.set_terminated(run_id, status), "mark the run " + status)
        raise
    finally:
        heartbeat.stop()
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        shutil.rmtree(outdir, ignore_errors=True)
    _move_aliases(sr)  # only now that the run is FINISHED


def latest_unfinished(stage: str, suite: str) -> str | None:
    """The newest FAILED/KILLED/RUNNING run of `stage` in a suite (what `--resume` picks by default): in the
    suite's own experiment and, on a server, created by the current user (`search_scope`)."""
    c = client()
    exps = search_scope(stage, suite, None)
    if not exps:
        return None
    filt = _runs_filter(
        [
            f"tags.`{TAG_STAGE}` = '{stage}'",
            f"tags.`{TAG_SUITE}` = '{suite}'",
            "attributes.status != 'FINISHED'",
        ]
    )
    runs = retry(
        lambda: c.search_runs(exps, filt, order_by=["attributes.start_time DESC"], max_results=20), "search"
    )
    for run in runs:  # a RUNNING run whose process is alive is not "interrupted"
        tags = dict(run.data.tags)
        if run.info.status == "RUNNING" and TAG_HOST in tags and not lease_gone(tags):
            continue
        return str(run.info.run_id)
    return None


# ----------------------------------------------------------------------------------- chain parent
@contextlib.contextmanager
def chain_run(suite: str, dataset: str | None, config: dict[str, Any]) -> Iterator[StageRun]:
    """The parent run of `fewscan run`: stage runs nest under it; reused ones are linked by tag."""
    c = client()
    exp_id = experiment_id(experiment_name(suite, dataset))
    present_experiment(
        exp_id, ui_view.experiment_description(suite, config.get("description", ""), dataset, exp_id)
    )
    tags = {"fewscan.chain": "true", TAG_SUITE: suite, "fewscan.version": __version__, **lease_tags()}
    if dataset:
        tags[TAG_DATASET] = dataset
    user = server_user()
    if user:
        tags[TAG_USER] = user
    run = retry(lambda: c.create_run(exp_id, tags=tags, run_name=f"chain {suite}"), "create the chain run")
    sr = StageRun(
        run.info.run_id, "chain", exp_id, Path(tempfile.mkdtemp(prefix="fewscan-chain-")), "", False
    )
    sr.artifact_uri = run.info.artifact_uri
    heartbeat = _Heartbeat(sr.run_id)
    try:
        sr.log_params(config)
        yield sr
        retry(lambda: c.set_terminated(sr.run_id, "FINISHED"), "finish the chain run")
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            sr.set_tags({TAG_ERROR: f"{type(err).__name__}: {err}"[:4900]})
            retry(lambda: c.set_terminated(sr.run_id, status), "mark the chain run " + status)
        raise
    finally:
        heartbeat.stop()
        shutil.rmtree(sr.outdir, ignore_errors=True)


def started_with(run_id: str, stage: str) -> tuple[dict[str, str], dict[str, Any] | None]:
    """A run's tags and the config it logged when it started (`config/<stage>.yaml`, None if it has
    none): what `--resume` compares with the settings it is given (pipeline/resume.py)."""
    run = retry(lambda: client().get_run(run_id), "read the run to resume")
    try:
        path = _artifact_path(run_id, run.info.artifact_uri, f"config/{stage}.yaml")
    except UpstreamError:
        return dict(run.data.tags), None
    return dict(run.data.tags), yaml.safe_load(path.read_text())


def run_status(run_id: str) -> str:
    return str(retry(lambda: client().get_run(run_id), "read a run").info.status)


__all__ = [
    "RunStatus",
    "StageResult",
    "StageRun",
    "UpstreamRun",
    "chain_run",
    "client",
    "code_version",
    "find_reusable",
    "fingerprint",
    "latest_run",
    "latest_unfinished",
    "resolve_model_ref",
    "resolve_upstream",
    "retry",
    "search_scope",
    "server_user",
    "stage_run",
    "tracking_uri",
]
