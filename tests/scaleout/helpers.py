"""Launch helpers for the scale-out tests: free loopback ports, torchrun and plain multi-process jobs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


@dataclass
class Finished:
    returncode: int
    output: str
    seconds: float


def torchrun(script: Path, args: list[str], nproc: int = 2, timeout: float = 90, **env: str) -> Finished:
    """`python -m torch.distributed.run --nproc_per_node N` on loopback; killed after `timeout` s."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--max_restarts",
        "0",
        str(script),
        *args,
    ]
    t0 = time.monotonic()
    p = subprocess.run(
        cmd, cwd=REPO, env=job_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )
    return Finished(p.returncode, p.stdout + p.stderr, time.monotonic() - t0)


def plain_ranks(
    script: Path, args: list[str], world: int = 2, timeout: float = 60, **env: str
) -> list[Finished]:
    """`world` plain Python processes with the torchrun variables set by hand (as a scheduler like
    `srun` would, no elastic agent watching them). Each is killed after `timeout` s."""
    port = str(free_port())
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=REPO,
            env=job_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                **env,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    out: list[Finished] = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text += "\n[killed by the test: timeout]"
        out.append(Finished(p.returncode, text, time.monotonic() - t0))
    return out
