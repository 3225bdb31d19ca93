"""Screenshot the MLflow UI views a researcher uses to review a fewscan store, in a real browser.

    python tools/ui_screenshots.py STORE [--out docs/img]

STORE is a folder holding `mlflow/mlflow.db` (a `fewscan demo --quick` folder, say). The script starts
`fewscan ui` on a free loopback port against that store, opens the links it prints in headless Chromium
(Debian: `apt-get install chromium`) driven over the DevTools protocol (a few lines of websocket below;
no extra package), and writes one PNG per view under --out:

    ui-runs.png       the suite's run table (fewscan's shared view: stage runs flat, key metrics as columns)
    ui-evaluate.png   the evaluate run: summary, upstream links back to ingest, plots, report excerpt
    ui-report.png     evaluate's report.md, rendered
    ui-plots.png      one of evaluate's plots in the Artifacts tab
    ui-metatrain.png  the meta-train run's learning curves

It checks what each view must show (the model-training view, not GenAI; the run names; the report) and
that the evaluate run's link to its ingest run opens that run, and exits 1 naming what did not work, so it
doubles as a check of docs/ui.md on a new MLflow release.
The MLflow Assistant side panel, which MLflow 3.17 opens by default, is closed before each screenshot.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipeline import atomic

WIDTH, HEIGHT = 1400, 900
MAX_PNG_BYTES = 300_000


def log(msg: str) -> None:
    print(f"[ui_screenshots] {msg}", flush=True)


class CDP:
    """The smallest DevTools-protocol client that does the job: one page's websocket, request/response."""

    def __init__(self, ws_url: str):
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", ws_url)
        if not m:
            raise RuntimeError(f"unexpected DevTools address {ws_url}")
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(4096)
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"DevTools refused the websocket: {head[:200]!r}")
        self.next_id = 0

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed the DevTools connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, text: str) -> None:
        data = text.encode()
        head = bytearray([0x81])  # one final text frame; a client must mask what it sends
        if len(data) < 126:
            head.append(0x80 | len(data))
        elif len(data) < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", len(data))
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", len(data))
        mask = os.urandom(4)
        self.sock.sendall(bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", self._read(8))
            parts.append(self._read(n))
            if b0 & 0x80:
                return b"".join(parts).decode()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    def js(self, expr: str) -> Any:
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ui(store: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    """`fewscan ui` on the store; returns the process and the experiment links it printed."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{(store / 'mlflow' / 'mlflow.db').resolve()}")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)],
        cwd=store,  # not the repository: its mlflow/ folder would shadow the package for `python -m mlflow`
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []
    # a thread drains the server's output (a full pipe would stall it) and keeps it for the links
    threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True).start()
    deadline = time.monotonic() + 300  # imports and a server with workers: slow on a loaded machine
    while True:
        pending = "".join(out)
        if proc.poll() is not None:
            raise RuntimeError(f"fewscan ui exited ({proc.returncode}): {pending[-2000:]}")
        links = re.findall(r"^  fewscan/\S+: (http\S+)$", pending, re.M)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200 and links:
                    return proc, links
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the MLflow UI did not answer on port {port} within 300 s: {pending[-2000:]}")
        time.sleep(1)


def start_browser() -> tuple[subprocess.Popen[str], CDP, str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        raise RuntimeError("no Chromium found: install it (Debian: apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="fewscan-ui-shots-")
    proc = subprocess.Popen(
        [
            exe,
            "--headless",
            "--no-sandbox",  # as root in a container; the page is our own loopback UI
            "--disable-gpu",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "about:blank",
        ],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Debian's `chromium` is a script that forks the browser
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"DevTools listening on ws://127.0.0.1:(\d+)/", line)
        if m:
            break
    else:
        raise RuntimeError("Chromium exited before opening its DevTools port")
    with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/json/list", timeout=30) as r:
        pages = [p for p in json.load(r) if p["type"] == "page"]
    cdp = CDP(pages[0]["webSocketDebuggerUrl"])
    cdp.call(
        "Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False
    )
    return proc, cdp, profile


# Clicks done before a screenshot: close the assistant panel and the shared-view banner, expand a
# collapsed description. By visible label, as a person would.
CLEANUP_JS = """
(() => {
  const byLabel = l => [...document.querySelectorAll('button')].filter(b => b.getAttribute('aria-label') === l);
  byLabel('Close').forEach(b => b.click());
  byLabel('Hide banner').forEach(b => b.click());
  [...document.querySelectorAll('button, a, span, div')]
    .filter(e => e.children.length === 0 && e.textContent.trim() === 'Show more')
    .forEach(e => (e.closest('button, a') || e).click());
  return true;
})()
"""


def shoot(
    cdp: CDP, url: str, out: Path, must_show: list[str], search: str | None = None, width: int = WIDTH
) -> None:
    """Open `url`, wait until the page shows every text of `must_show`, tidy up, screenshot to `out`."""
    cdp.call(
        "Emulation.setDeviceMetricsOverride", width=width, height=HEIGHT, deviceScaleFactor=1, mobile=False
    )
    cdp.call("Page.navigate", url="about:blank")  # a new hash alone would keep the single-page app's state
    time.sleep(1)
    cdp.call("Page.navigate", url=url)
    deadline = time.monotonic() + 120
    text = ""
    while time.monotonic() < deadline:
        time.sleep(2)
        text = cdp.js("document.body ? document.body.innerText : ''") or ""
        if all(s in text for s in must_show):
            break
    missing = [s for s in must_show if s not in text]
    if missing:
        raise RuntimeError(f"{out.name}: {url} never showed {missing}")
    cdp.js(CLEANUP_JS)
    time.sleep(6)  # images and the relaid-out table
    if search:  # type into the page's search box, as a person would (React listens to input events)
        cdp.js(
            "(() => { const i = document.querySelector('input[placeholder^=\"Search\"]'); if (!i) return;"
            " Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set"
            f".call(i, {json.dumps(search)}); i.dispatchEvent(new Event('input', {{bubbles: true}})); }})()"
        )
        time.sleep(4)
    if "GenAI" in text and "Traces" in text and "Evaluation runs" in text:
        raise RuntimeError(f"{out.name}: the UI is in its GenAI view (it lists 'Evaluation runs')")
    data = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
    if len(data) > MAX_PNG_BYTES:
        raise RuntimeError(f"{out.name}: {len(data)} bytes, over {MAX_PNG_BYTES}; choose a calmer view")
    atomic.write_bytes(out, data)
    log(f"{out.name}: {len(data) // 1000} KB from {url}")


def follow_link(cdp: CDP, run_id: str, must_show: str) -> None:
    """On the open page, click the description's link to run `run_id` (in this tab: the UI opens
    description links in a new one) and check that the run's page shows `must_show`."""
    found = cdp.js(
        "(() => { const a = [...document.querySelectorAll('a')].find(a => (a.getAttribute('href') || '')"
        f".startsWith('#/experiments/') && a.getAttribute('href').includes('/runs/{run_id}?'));"
        " if (!a) return false; a.removeAttribute('target'); a.click(); return true; })()"
    )
    if not found:
        raise RuntimeError(f"the evaluate run's description has no link to run {run_id}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(2)
        if run_id in (cdp.js("location.href") or "") and must_show in (
            cdp.js("document.body.innerText") or ""
        ):
            log(f"lineage link to {must_show!r} opens its run")
            return
    raise RuntimeError(f"the lineage link to run {run_id} did not open a page showing {must_show!r}")


def latest_run(store: Path, stage: str) -> tuple[str, str, str]:
    """(experiment id, run id, run name) of the newest FINISHED `stage` run in the store."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(store / 'mlflow' / 'mlflow.db').resolve()}"
    from pipeline import tracking

    c = tracking.client()
    exps = [e.experiment_id for e in c.search_experiments(filter_string="name LIKE 'fewscan/%'")]
    runs = c.search_runs(
        exps,
        f"tags.`fewscan.stage` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise RuntimeError(f"no finished {stage} run in {store}: run `fewscan demo --quick` there first")
    r = runs[0]
    return str(r.info.experiment_id), r.info.run_id, r.info.run_name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "store", type=Path, help="folder holding mlflow/mlflow.db (e.g. a `fewscan demo --quick` folder)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img")
    args = ap.parse_args(argv)
    if not (args.store / "mlflow" / "mlflow.db").is_file():
        print(
            f"error: {args.store / 'mlflow' / 'mlflow.db'} does not exist; give the folder of a fewscan store"
        )
        return 2
    from pipeline import ui_view

    t0 = time.monotonic()
    exp_id, ev_id, ev_name = latest_run(args.store, "evaluate")
    from pipeline import tracking

    # the evaluate run's own upstream runs, not merely the newest of each stage
    ups = {ln.stage: ln for ln in tracking.lineage({"evaluate": tracking.UpstreamRun.from_id(ev_id)})}
    if "meta-train" not in ups or "ingest" not in ups:
        raise RuntimeError(f"evaluate run {ev_id} records no meta-train or ingest upstream run")
    mt_id, mt_name = ups["meta-train"].run_id, ups["meta-train"].name
    in_id, in_name = ups["ingest"].run_id, ups["ingest"].name
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log(f"starting fewscan ui on {base} for {args.store}")
    ui, links = start_ui(args.store, port)
    browser, cdp, profile = None, None, ""
    try:
        browser, cdp, profile = start_browser()
        args.out.mkdir(parents=True, exist_ok=True)
        shots: list[tuple[str, str, list[str], str | None, int]] = [
            # the link `fewscan ui` printed, as a researcher would open it
            ("ui-runs.png", links[0], [ev_name, mt_name, "Description"], None, 2000),  # wide: the columns
            (
                "ui-evaluate.png",
                f"{base}/{ui_view.run_path(exp_id, ev_id)}",
                [ev_name, "Upstream:", "ingest"],
                None,
                WIDTH,
            ),
            (
                "ui-report.png",
                f"{base}/{ui_view.artifact_path(exp_id, ev_id, 'report.md')}",
                ["Verdict"],
                None,
                WIDTH,
            ),
            (
                "ui-plots.png",
                f"{base}/{ui_view.artifact_path(exp_id, ev_id, 'plots/adaptation_vs_kshot.png')}",
                ["adaptation_vs_kshot.png"],
                None,
                WIDTH,
            ),
            (
                "ui-metatrain.png",
                f"{base}/#/experiments/{exp_id}/runs/{mt_id}/model-metrics?{ui_view.WORKFLOW}",
                [mt_name],
                "val_acc",  # the validation curves, not every logged metric
                WIDTH,
            ),
        ]
        for name, url, must, search, width in shots:
            shoot(cdp, url, args.out / name, must, search, width)
            if name == "ui-evaluate.png":  # the lineage back to ingest is a link a researcher can follow
                follow_link(cdp, in_id, in_name)
    finally:
        if browser is not None:
            os.killpg(browser.pid, signal.SIGTERM)  # the browser and every process it started
            browser.wait(timeout=30)
            shutil.rmtree(profile, ignore_errors=True)
        ui.send_signal(signal.SIGTERM)  # fewscan ui stops its server's whole process group
        ui.wait(timeout=60)
    log(f"{len(shots)} screenshots in {args.out} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
