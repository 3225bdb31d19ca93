"""Operating the store: a server's 401 as one line, leases of stage runs, `fewscan status`, creating a
fresh store from two processes at once."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.errors import TrackingError


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
