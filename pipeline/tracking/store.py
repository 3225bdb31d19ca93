"""Where the tracking store is, the one `MlflowClient` for it, and a bounded retry around SQLite's
single-writer lock.

We use `MlflowClient` with explicit run ids rather than the fluent API: an explicit run is what the design
asks for (docs/ARCHITECTURE.md, "Five stages, each an MLflow run"), and it keeps nested chain runs
independent of process-global "active run" state.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import TrackingError
from pipeline.progress import log

T = TypeVar("T")

DEFAULT_DB = Path("mlflow") / "mlflow.db"
DEFAULT_ARTIFACTS = Path("mlflow") / "artifacts"
RETRY_SECONDS = float(os.environ.get("FEWSCAN_DB_RETRY_S", "120"))


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
        from pipeline.tracking import leases  # leases uses this client: imported when first opened

        leases.reap_dead_runs()  # every command that opens the store closes the runs of processes that are gone
    return _client


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


def http_status(err: MlflowException) -> int | None:
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
