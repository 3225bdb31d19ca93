"""Real services for the lab-deployment test, on 127.0.0.1 only: a PostgreSQL cluster of its own (the
Debian package's `initdb`/`pg_ctl`, never the system's cluster) and moto's S3 server.

Each starter is a context manager that tears down what it started (by process id, with bounded waits);
`why_missing_*` say in one line what is missing and how to install it, for the test's skip reason.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL_HINT = "apt-get install postgresql and pip install -e '.[lab]' (.ci/run does both)"


def postgres_bindir() -> Path | None:
    """The folder with `initdb` and `pg_ctl`: on PATH, else the newest /usr/lib/postgresql/<ver>/bin (where
    Debian's package puts them, off PATH)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent

    def version(d: str) -> int:
        m = re.search(r"/postgresql/(\d+)/", d)
        return int(m.group(1)) if m else -1

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(Path(d) / "initdb", os.X_OK) and os.access(Path(d) / "pg_ctl", os.X_OK):
            return Path(d)
    return None


def why_missing_postgres() -> str | None:
    if postgres_bindir() is None:
        return f"PostgreSQL server programs (initdb, pg_ctl) not found; {INSTALL_HINT}"
    # SQLAlchemy 2.1 maps postgresql:// to psycopg (3), no longer psycopg2
    if importlib.util.find_spec("psycopg") is None:
        return f"psycopg (SQLAlchemy's PostgreSQL driver) is not installed; {INSTALL_HINT}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and initdb refuses root: no 'postgres' system user to run PostgreSQL as"
    return None


def why_missing_s3() -> str | None:
    # moto's server mode needs its [server] extra (flask_cors among it); boto3 creates and lists the bucket
    for mod in ("moto", "flask_cors", "boto3"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (moto[server] and boto3: S3 server and client); {INSTALL_HINT}"
    return None


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def connect(self, dbname: str) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=dbname
        )

    def uri(self, dbname: str) -> str:
        """No password in the URI: libpq reads PGPASSWORD (docs/scaling.md, 'For a lab')."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"


def _as_postgres_user() -> dict[str, Any]:
    """subprocess arguments that run a command as the `postgres` user when we are root (initdb and the
    server refuse to run as root); nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _run(cmd: list[str], cwd: Path, timeout: float) -> None:
    res = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, **_as_postgres_user()
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:2])} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        )


@contextmanager
def postgres(port: int, databases: tuple[str, ...]) -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster on 127.0.0.1:`port` (TCP only, password auth), with `databases`
    owned by the role `mlflow`; stopped and deleted on exit."""
    bindir = postgres_bindir()
    assert bindir is not None
    # /tmp, not pytest's tmp_path: pytest's folders are 0700 and the server runs as `postgres` under root
    root = Path(tempfile.mkdtemp(prefix="fewscan-lab-pg-"))
    data, sockets, log = root / "data", root / "sock", root / "server.log"
    pg = Postgres("127.0.0.1", port, "mlflow", secrets.token_urlsafe(18))
    started = False
    try:
        try:
            started = _start_postgres(bindir, pg, root, data, sockets, log, databases)
        except Exception as err:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"PostgreSQL on port {port}: {err}\nserver log:\n{tail}") from err
        yield pg
    finally:
        if started or (data / "postmaster.pid").exists():
            _stop_postgres(bindir, data, root)
        shutil.rmtree(root, ignore_errors=True)


def _start_postgres(
    bindir: Path, pg: Postgres, root: Path, data: Path, sockets: Path, log: Path, databases: tuple[str, ...]
) -> bool:
    sockets.mkdir()
    pwfile = root / "pwfile"
    pwfile.write_text(pg.password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (root, sockets, pwfile):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    _run(
        [str(bindir / "initdb"), "-D", str(data), "-U", pg.user, "--pwfile", str(pwfile),
         "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C", "--no-sync"],
        root, timeout=180,
    )  # fmt: skip
    pwfile.unlink()
    # TCP on loopback only; the Unix socket in our own folder, never the system's /var/run/postgresql
    opts = f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {sockets}"
    _run(
        [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "120", "start"],
        root, timeout=150,
    )  # fmt: skip
    conn = pg.connect("postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            for name in databases:
                cur.execute(f'CREATE DATABASE "{name}" OWNER "{pg.user}"')
    finally:
        conn.close()
    return True


def _stop_postgres(bindir: Path, data: Path, root: Path) -> None:
    # immediate: no shutdown checkpoint (tens of seconds on a busy disk) for a cluster deleted right after
    try:
        _run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "60", "stop"],
            root,
            timeout=90,
        )
    except (RuntimeError, subprocess.TimeoutExpired):
        # the postmaster's pid is the first line of postmaster.pid; SIGQUIT is PostgreSQL's immediate stop
        pidfile = data / "postmaster.pid"
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGQUIT)
            except (ProcessLookupError, ValueError):
                pass


@dataclass
class S3:
    endpoint: str
    bucket: str
    # moto accepts any key; these are placeholders, not secrets (the mlflow server needs some)
    credentials = {
        "AWS_ACCESS_KEY_ID": "fewscan-lab-test",
        "AWS_SECRET_ACCESS_KEY": "fewscan-lab-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
            region_name=self.credentials["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        ):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """End a process started with start_new_session=True and everything in its group (by its id)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Poll `url` until it answers 200 (at most `timeout` s); fail with the log tail if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} not up within {timeout} s:\n{log.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(1)


@contextmanager
def s3_server(port: int, bucket: str, folder: Path) -> Iterator[S3]:
    """moto's S3-compatible server (a separate process) on 127.0.0.1:`port`, with an empty `bucket`."""
    exe = Path(sys.executable).parent / "moto_server"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log_path = folder / "moto.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(port)],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            endpoint = f"http://127.0.0.1:{port}"
            wait_http(endpoint + "/moto-api/", proc, log_path, "moto_server", timeout=120)
            s3 = S3(endpoint, bucket)
            s3.client().create_bucket(Bucket=bucket)
            yield s3
        finally:
            stop_group(proc)
