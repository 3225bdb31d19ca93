"""Operating the store: a server's 401 as one line, leases of stage runs, `fewscan status`, creating a
fresh store from two processes at once."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.errors import TrackingError, UpstreamError


class _Refuse(http.server.BaseHTTPRequestHandler):
    def _deny(self) -> None:
        body = b"You are not authenticated. Please see the documentation."
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _deny

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server(tmp_store: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{srv.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        yield uri
    finally:
        srv.shutdown()


def test_server_401_is_one_line_naming_the_fix(refusing_server: str, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(TrackingError, match="refused the password of user 'alice'.*MLFLOW_TRACKING_PASSWORD"):
        tracking.search_scope("episodes", "demo", None)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    from pipeline.cli import main

    assert main(["adapt", "--model", "models:/x@current", "--support", "."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "asks for a user and password (HTTP 401)" in err[0], err
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in err[0]


def test_predict_exits_non_zero_when_no_scan_could_be_read(tmp_path: Path, monkeypatch, capsys) -> None:
    import pipeline.adapt.predict as predict_mod
    from pipeline.cli import main

    def fake_predict(*a: object, **kw: object) -> dict[str, int]:
        return {"n_scans": 3, "n_predicted": 0, "n_errors": 3}

    monkeypatch.setattr(predict_mod, "predict", fake_predict)
    args = ["predict", "--model", "models:/m@current", "--input", str(tmp_path)]
    assert main(args) == 2
    assert "none of the 3 scan(s) under --input could be read" in capsys.readouterr().err
    monkeypatch.setattr(predict_mod, "predict", lambda *a, **k: {"n_scans": 3, "n_predicted": 1})
    assert main(args) == 0


# ------------------------------------------------------------------------------------------ leases
HOLD = """
import sys, time
from pipeline import tracking
with tracking.stage_run("ingest", run_name="hold", config={}, upstream={}, fp="f" * 24, suite="leases",
                        dataset="leases") as run:
    print(run.run_id, flush=True)
    time.sleep(600)
"""


def _start_holder(cwd: Path) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD], cwd=cwd, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    rid = p.stdout.readline().strip()
    assert len(rid) == 32, rid
    return p, rid


def test_sigkilled_run_is_marked_killed_by_the_next_command_and_a_live_one_is_not(tmp_store: Path) -> None:
    dead, dead_id = _start_holder(tmp_store)
    live, live_id = _start_holder(tmp_store)
    try:
        c = tracking.client()
        assert c.get_run(dead_id).info.status == "RUNNING"
        tags = c.get_run(dead_id).data.tags
        assert tags[tracking.TAG_PID] == str(dead.pid) and tags[tracking.TAG_HOST] == socket.gethostname()
        assert tracking.latest_unfinished("ingest", "leases") is None  # both alive: nothing to resume
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert c.get_run(dead_id).info.status == "RUNNING"  # nobody could mark it
        tracking.store._client = None  # the next command opens the store
        tracking.client()
        run = c.get_run(dead_id)
        assert run.info.status == "KILLED"
        assert f"pid {dead.pid}" in run.data.tags[tracking.TAG_ERROR]
        assert c.get_run(live_id).info.status == "RUNNING"  # its process is alive: left alone
        # a KILLED run is never reused; --resume picks it, never the live one, and takes its lease
        assert tracking.find_reusable("ingest", "f" * 24, suite="leases", dataset="leases") is None
        assert tracking.latest_unfinished("ingest", "leases") == dead_id
        kw = dict(run_name="r", config={}, upstream={}, fp="f" * 24, suite="leases", dataset="leases")
        with pytest.raises(UpstreamError, match="still RUNNING"):
            with tracking.stage_run("ingest", resume_run_id=live_id, **kw):  # type: ignore[arg-type]
                pass
        with tracking.stage_run("ingest", resume_run_id=dead_id, **kw) as resumed:  # type: ignore[arg-type]
            assert c.get_run(resumed.run_id).data.tags[tracking.TAG_PID] == str(os.getpid())
        assert c.get_run(dead_id).info.status == "FINISHED"
    finally:
        live.kill()
        live.wait()
        dead.kill()


def test_lease_by_heartbeat_age_for_another_host() -> None:
    now = time.time()
    other = {tracking.TAG_HOST: "elsewhere", tracking.TAG_PID: "1", tracking.TAG_HEARTBEAT: str(int(now))}
    assert tracking.lease_gone(other, now) is None
    why = tracking.lease_gone(other, now + tracking.LEASE_TIMEOUT_S + 60)
    assert why is not None and "(pid 1 on elsewhere) sent no heartbeat for" in why
    assert f"FEWSCAN_LEASE_TIMEOUT_S={tracking.LEASE_TIMEOUT_S:.0f} s" in why
    assert tracking.lease_gone({}, now + 10**6) is None  # a run without a lease (older fewscan): left alone


def test_heartbeat_is_refreshed_while_the_run_is_open(tmp_store: Path, monkeypatch) -> None:
    monkeypatch.setattr(tracking.leases, "HEARTBEAT_S", 0.2)
    with tracking.stage_run(
        "ingest", run_name="x", config={}, upstream={}, fp="a" * 24, suite=None, dataset="beat"
    ) as run:
        c = tracking.client()
        first = c.get_run(run.run_id).data.tags[tracking.TAG_HEARTBEAT]
        c.set_tag(run.run_id, tracking.TAG_HEARTBEAT, "0")
        time.sleep(1.5)
        assert int(c.get_run(run.run_id).data.tags[tracking.TAG_HEARTBEAT]) >= int(first)


# --------------------------------------------------------------------------------- store creation
RACE = """
import sys, time
from pipeline import tracking
t0 = float(sys.argv[1])
time.sleep(max(0.0, t0 - time.time()))  # everything imported: start together
tracking.client()
print("ok", flush=True)
"""


def test_two_processes_create_a_fresh_store_together(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    folders = [tmp_path / f"fresh{i}" for i in range(2)]
    procs = []
    t0 = time.time() + 12  # after the imports of all four
    for folder in folders:
        folder.mkdir()
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", RACE, str(t0)],
                    cwd=folder,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and out.strip() == "ok", err[-3000:]
    for folder in folders:
        assert (folder / "mlflow" / "mlflow.db").stat().st_size > 0
