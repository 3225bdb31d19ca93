"""Launch helpers for the scale-out tests: free loopback ports, torchrun and plain multi-process jobs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.distributed as dist

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


def require(ok: bool, why: str) -> None:
    """Skip a test whose prerequisite (gloo, a free port, a program) is missing here, but fail under CI
    (`CI` set, as .ci/run does): the two-rank tests are the only check of the distributed path and must
    not vanish from CI unnoticed."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set: a missing prerequisite of this test is a failure, not a skip)")
    pytest.skip(why, allow_module_level=True)


def require_gloo() -> None:
    """torch.distributed with the gloo backend, which every multi-process test here uses on CPU."""
    require(
        dist.is_available() and dist.is_gloo_available(),
        "this torch build has no torch.distributed gloo backend (the CPU wheels from pytorch.org have it)",
    )


def torchrun(
    script: Path | str,
    args: list[str],
    nproc: int = 2,
    timeout: float = 90,
    cwd: Path = REPO,
    **env: str,
) -> Finished:
    """`python -m torch.distributed.run --nproc_per_node N SCRIPT ARGS` (what the `torchrun` command runs)
    on loopback, in `cwd`; killed after `timeout` s. SCRIPT is a path, or `-m MODULE` as one string."""
    require_gloo()
    target = script.split() if isinstance(script, str) and script.startswith("-m ") else [str(script)]
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
        *target,
        *args,
    ]
    t0 = time.monotonic()
    p = subprocess.run(
        cmd, cwd=cwd, env=job_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )
    return Finished(p.returncode, p.stdout + p.stderr, time.monotonic() - t0)


def plain_ranks(
    script: Path, args: list[str], world: int = 2, timeout: float = 60, **env: str
) -> list[Finished]:
    """`world` plain Python processes with the torchrun variables set by hand (as a scheduler like
    `srun` would, no elastic agent watching them). Each is killed after `timeout` s."""
    require_gloo()
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
