"""How many CPUs this process may use, and torch's intra-op threads sized from it (docs/scaling.md, "CPU
threads and worker pools").

`os.cpu_count()` counts the machine's cores, not the ones this process gets: a container limited by a
cgroup CPU quota, or a job pinned with `taskset`/a scheduler's affinity, sees every core of the host. Pools
sized from it oversubscribe the CPUs (intra-op threads x task threads x worker processes), and on a busy
machine that turns a proportional slowdown into a collapse (issue 17: x28 for a x8 load). Every pool and
thread count in fewscan is chosen from `available_cpus()`, and no two pools multiply: a worker process or
a task thread runs torch with one intra-op thread.

Nothing here imports torch at module level (the CLI's `--help` must stay fast).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import ConfigError

ENV = "FEWSCAN_CPUS"
# Module attributes (not constants inlined in the functions) so that tests can point them at fake files.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cpus() -> int:
    """CPUs this process may use: `FEWSCAN_CPUS` if set; else the CPUs of its affinity mask, capped by the
    cgroup CPU quota (v2 `cpu.max` or v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`, of its own cgroup and
    every ancestor) rounded down; at least 1."""
    override = os.environ.get(ENV, "").strip()
    if override:
        try:
            n = int(override)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(
                f"{ENV}={override!r} is not a positive whole number of CPUs; set it to e.g. 2 or unset it"
            )
        return n
    n = _affinity_cpus()
    quota = cgroup_quota_cpus()
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


def _affinity_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on (taskset, containers)
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def cgroup_quota_cpus() -> int | None:
    """The tightest CPU quota (quota / period, rounded down, at least 1) over this process's cgroup and its
    ancestors, v2 or v1; None when there is no quota or no cgroup file can be read."""
    found: list[float] = []
    for d in _cgroup_dirs():
        q = _read_quota_v2(d / "cpu.max")
        if q is None:
            q = _read_quota_v1(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us")
        if q is not None:
            found.append(q)
    if not found:
        return None
    return max(1, int(min(found)))


def _cgroup_dirs() -> list[Path]:
    """The directories that may hold this process's CPU controller files, innermost first: its own
    cgroup's folder and each parent up to the mount (v2 unified and v1 `cpu` hierarchies). In a container
    the path in /proc/self/cgroup may not exist under the mount (the mount is the container's own cgroup),
    so the mount roots are always included."""
    roots: list[tuple[Path, str]] = []  # (mount, path of this process's cgroup in that hierarchy)
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: "0::/path"
            roots.append((CGROUP_ROOT, path))
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                if (CGROUP_ROOT / name).is_dir():
                    roots.append((CGROUP_ROOT / name, path))
                    break
    if not roots:
        roots = [(CGROUP_ROOT, "/"), (CGROUP_ROOT / "cpu", "/"), (CGROUP_ROOT / "cpu,cpuacct", "/")]
    out: list[Path] = []
    for mount, path in roots:
        d = mount / path.strip("/") if path.strip("/") else mount
        while True:
            if d not in out:
                out.append(d)
            if d == mount or mount not in d.parents:
                break
            d = d.parent
        if mount not in out:
            out.append(mount)
    return out


def _read_quota_v2(path: Path) -> float | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_quota_v1(quota_path: Path, period_path: Path) -> float | None:
    try:
        quota = int(quota_path.read_text().strip())
        period = int(period_path.read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None  # -1 = no quota


def default_threads() -> int:
    """Intra-op threads for torch in a process that runs nothing else in parallel: OMP_NUM_THREADS when the
    user set it (the standard override, honoured as torch does), else `available_cpus()`."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env.split(",")[0])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    return available_cpus()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run with `n` intra-op CPU threads (None: `default_threads()`), restoring the previous setting when the
    block ends, also on an error, so that one stage's choice does not leak into the next stage of a chain
    run in the same process. Yields the number in force."""
    import torch

    want = default_threads() if n is None else n
    if want < 1:
        raise ConfigError(f"torch threads must be >= 1, got {want}")
    before = torch.get_num_threads()
    if want != before:
        torch.set_num_threads(want)
    try:
        yield want
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
