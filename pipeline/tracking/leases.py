"""Leases of RUNNING runs: a run whose process is gone is marked KILLED by the next command.

A process killed with SIGKILL (or a machine that lost power) cannot mark its run; it would stay RUNNING
forever. Every open run therefore holds a lease: its host and pid, and a heartbeat tag refreshed by a
daemon thread. A run is dead when its host is this one and its pid is gone, or when its heartbeat is older
than LEASE_TIMEOUT_S (another host, or a reused pid); any command that opens the store marks dead runs
KILLED, with the reason in `fewscan.error` (docs/scaling.md, "Killed runs").
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

from pipeline.errors import TrackingError
from pipeline.progress import log
from pipeline.tracking import owners
from pipeline.tracking.store import client, retry
from pipeline.tracking.tags import TAG_ERROR, TAG_HEARTBEAT, TAG_HOST, TAG_PID, TAG_STAGE

HEARTBEAT_S = float(os.environ.get("FEWSCAN_HEARTBEAT_S", "60"))  # rare: SQLite has one writer
LEASE_TIMEOUT_S = float(os.environ.get("FEWSCAN_LEASE_TIMEOUT_S", "900"))


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
            lambda: c.search_runs(
                ids, owners.runs_filter(["attributes.status = 'RUNNING'"]), max_results=1000
            ),
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


class Heartbeat:
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
