"""Benchmark: each stage of the quick chain on an idle machine and under a fixed background load (issue 17
item 5; docs/scaling.md, "CPU threads and worker pools").

Two passes over the stages of `fewscan demo --quick` (the demo_quick suite): demo-data generation (unless
`--data` names a folder that already holds it), ingest, episodes, meta-train, adapt and evaluate, each as
the `fewscan` command a user types, in a fresh working folder per pass (own MLflow store, no reuse, no
decode cache). The first pass runs alone; the second with `--hogs` background processes (default 2) that
each burn one CPU in a pure-Python loop, started before the pass and stopped after it (and bounded in time
by themselves, so that a killed benchmark leaves nothing running).

The bound. With C = the CPUs fewscan may use (`pipeline.cpus.available_cpus()`, which is what it sizes its
pools from) and N busy processes competing for the same C CPUs, a stage that keeps up to C threads
runnable gets, under the kernel's fair scheduler, at least C/(C + N) of the CPU time it had alone, so its
wall time grows at most by (C + N)/C: x2 for 2 hogs on 2 CPUs. A single-threaded stage fares better
(max(1, (1 + N)/C)); I/O waits do not slow down at all. A stage that oversubscribes the CPUs (more
runnable threads than C, OpenMP threads spinning) does worse than the bound, because its threads preempt
each other and wait for the slowest: that is what this benchmark detects (issue 17: x28 for a x8 load).
A stage is reported `ok` when its slowdown is within the bound plus `--tolerance` (default 15%, for the
noise of one run; the loaded pass also pays a little for cache misses the idle one does not). The idle
pass is only as idle as the machine: the load average is printed before each pass.

Takes a few minutes on 2 CPU cores (the quick chain twice, the second time about twice as slow):

    .venv/bin/python benchmarks/bench_busy.py [--hogs 2] [--data DIR] [--workdir DIR] [--keep]
        [--stages ingest,episodes,...] [--set STAGE:KEY=VALUE ...]

`--data DIR`: a folder in which `fewscan demo --quick` already ran (it holds demo_data/demo_quick).
`--set meta-train:outer.steps=2` passes `--set outer.steps=2` to that stage (to shrink a check run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import stage_configs  # noqa: E402 (after the path: the repo's own package)

SUITE = "demo_quick"
# The generated study, then the stages in the registry's order (pipeline/stage_configs.py), each after the
# one whose output it reads (ingest reads the study).
STAGES = ("demo-data", *stage_configs.ORDER)
UPSTREAM = {s.name: s.upstream[0] if s.upstream else "demo-data" for s in stage_configs.SPECS}
# A hog stops by itself after this long even if nothing stops it (the benchmark was killed).
HOG = (
    "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), GIT_PYTHON_REFRESH="quiet")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _command(stage: str, sets: list[str]) -> list[str]:
    if stage == "demo-data":
        code = f"from pipeline.demo import ensure_demo_data; ensure_demo_data({SUITE!r})"
        return [sys.executable, "-c", code]
    args = {
        "ingest": ["ingest", SUITE, "--suite", SUITE, "--no-cache"],
        "episodes": ["episodes", SUITE],
        "meta-train": ["meta-train", SUITE],
        "adapt": ["adapt", SUITE],
        "evaluate": ["evaluate", SUITE],
    }[stage]
    for s in sets:
        args += ["--set", s]
    return [sys.executable, "-m", "pipeline.cli", *args]


def _run_pass(
    name: str, workdir: Path, data: Path | None, stages: list[str], sets: dict[str, list[str]]
) -> dict[str, float]:
    d = workdir / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if data is not None:
        (d / "demo_data").symlink_to((data / "demo_data").resolve(), target_is_directory=True)
    print(f"[bench_busy] {name} pass in {d}; load average {os.getloadavg()[0]:.2f}", flush=True)
    times: dict[str, float] = {}
    for i, stage in enumerate(stages, 1):
        t0 = time.perf_counter()
        res = subprocess.run(
            _command(stage, sets.get(stage, [])), cwd=d, env=_env(), capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        (d / f"{stage}.stdout.txt").write_text(res.stdout)
        (d / f"{stage}.stderr.txt").write_text(res.stderr)
        if res.returncode != 0:
            raise SystemExit(
                f"[bench_busy] {name}: {stage} failed (exit {res.returncode}); its output is in {d}/{stage}.*.txt\n"
                + res.stderr[-3000:]
            )
        times[stage] = wall
        print(f"[bench_busy] {name} [{i}/{len(stages)}] {stage}: {wall:.1f} s", flush=True)
    return times


def _start_hogs(n: int, max_s: float) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", HOG, str(max_s)]) for _ in range(n)]


def _stop_hogs(hogs: list[subprocess.Popen[bytes]]) -> None:
    for p in hogs:
        p.terminate()
    for p in hogs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> int:
    from pipeline.cpus import available_cpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hogs", type=int, default=2, help="background CPU-burning processes (default 2)")
    ap.add_argument("--data", type=Path, help="a folder holding demo_data/demo_quick (skips generation)")
    ap.add_argument("--workdir", type=Path, help="where the passes run (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the working folders (stage outputs, stores)")
    ap.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )
    ap.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE", help="a stage override")
    ap.add_argument("--tolerance", type=float, default=0.15, help="slack on the bound (default 0.15)")
    ap.add_argument("--max-load-s", type=float, default=3600, help="hogs stop by themselves after this long")
    args = ap.parse_args()
    if args.hogs < 1:
        raise SystemExit(f"--hogs must be >= 1, got {args.hogs}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    data = args.data
    if data is not None:
        if not (data / "demo_data" / SUITE).is_dir():
            raise SystemExit(
                f"--data {data}: no demo_data/{SUITE} in it; run `fewscan demo --quick` there first"
            )
        stages = [s for s in stages if s != "demo-data"]
    have = set(stages) | ({"demo-data"} if data is not None else set())
    missing = sorted({UPSTREAM[s] for s in stages if s in UPSTREAM and UPSTREAM[s] not in have})
    if missing:
        raise SystemExit(
            f"--stages {args.stages}: each pass starts from an empty store, so {missing} must run too "
            "(or, for demo-data, give --data)"
        )
    sets: dict[str, list[str]] = {}
    for s in args.set:
        stage, sep, kv = s.partition(":")
        if not sep or stage not in STAGES or "=" not in kv:
            raise SystemExit(f"--set {s!r}: expected STAGE:KEY=VALUE with STAGE one of {','.join(STAGES)}")
        sets.setdefault(stage, []).append(kv)

    cpus = available_cpus()
    bound = (cpus + args.hogs) / cpus
    print(
        f"[bench_busy] {cpus} CPU(s) available to fewscan, {args.hogs} hog(s): proportional bound x{bound:.2f}"
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fewscan-bench-busy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        idle = _run_pass("idle", workdir, data, stages, sets)
        hogs = _start_hogs(args.hogs, args.max_load_s)
        try:
            time.sleep(1.0)  # let the hogs reach the run queue
            busy = _run_pass("busy", workdir, data, stages, sets)
        finally:
            _stop_hogs(hogs)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n| stage | idle (s) | {args.hogs} hogs (s) | slowdown | bound | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    worst = 0.0
    for s in stages:
        r = busy[s] / idle[s]
        worst = max(worst, r)
        verdict = "ok" if r <= bound * (1 + args.tolerance) else "WORSE than proportional"
        print(f"| {s} | {idle[s]:.1f} | {busy[s]:.1f} | x{r:.2f} | x{bound:.2f} | {verdict} |")
    total_i, total_b = sum(idle.values()), sum(busy.values())
    print(f"| total | {total_i:.1f} | {total_b:.1f} | x{total_b / total_i:.2f} | x{bound:.2f} | |")
    n_bad = sum(busy[s] / idle[s] > bound * (1 + args.tolerance) for s in stages)
    print(
        f"\n[bench_busy] {len(stages)} stages, worst slowdown x{worst:.2f} against a bound of x{bound:.2f} "
        f"({cpus} CPUs, {args.hogs} hogs); {n_bad} stage(s) worse than proportional"
    )
    return 1 if n_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
