"""Meta-training throughput (tasks/s) with 1 and 2 processes on this machine.

Runs real MAML meta-training through `MetaLearner` (tests/scaleout/maml_worker.py, configurations
`BENCH_SPECS`: Conv-4 32 filters x 4 blocks on 16x16 2-way 1-shot tasks, meta-batch 16, 3 inner steps,
first- and second-order) as:

- 1 process, 1 intra-op thread (the reference),
- 1 process, as many intra-op threads as cores (what a plain `fewscan meta-train` does),
- N processes under `torchrun --nproc_per_node N` (gloo on 127.0.0.1), 1 thread each (torchrun's default).

Throughput excludes process start-up and the first (warm-up) step. The arrangements are interleaved and
repeated, and the median is reported with its ratio to the reference, because the machine is shared.

    python benchmarks/bench_distributed.py [--repeats 2] [--nproc 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "scaleout" / "maml_worker.py"
RESULT = re.compile(r"RESULT (\S+) world=(\d+) threads=(\d+) .*tasks_per_s=([0-9.]+)")


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(nproc: int, threads: int) -> dict[str, float]:
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), "--specs", "bench"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(WORKER),
            "--specs",
            "bench",
        ]
    p = subprocess.run(cmd, cwd=REPO, env=_env(threads), capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    out = {m.group(1): float(m.group(4)) for m in RESULT.finditer(p.stdout)}
    if not out:
        raise SystemExit(f"no RESULT line from {' '.join(cmd)}:\n{p.stdout[-2000:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    arrangements = [("1 process, 1 thread", 1, 1), (f"1 process, {cores} threads", 1, cores)]
    arrangements.append((f"{args.nproc} processes (torchrun, gloo), 1 thread each", args.nproc, 1))
    got: dict[str, dict[str, list[float]]] = {a[0]: {} for a in arrangements}
    t0 = time.monotonic()
    for rep in range(args.repeats):
        for name, nproc, threads in arrangements:
            for spec, v in run(nproc, threads).items():
                got[name].setdefault(spec, []).append(v)
            print(
                f"[{time.monotonic() - t0:.0f} s] repeat {rep + 1}: {name} done", file=sys.stderr, flush=True
            )
    load = os.getloadavg()
    print(f"machine: {cores} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
    ref_name = arrangements[0][0]
    specs = sorted(got[ref_name])
    print("| arrangement | " + " | ".join(f"{s} tasks/s (x ref)" for s in specs) + " |")
    print("|---|" + "---|" * len(specs))
    for name, _, _ in arrangements:
        cells = []
        for s in specs:
            med = statistics.median(got[name][s])
            ref = statistics.median(got[ref_name][s])
            runs = ", ".join(f"{v:.2f}" for v in got[name][s])
            cells.append(f"{med:.2f} (x{med / ref:.2f}; runs {runs})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
