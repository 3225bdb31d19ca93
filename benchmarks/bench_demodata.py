"""Benchmark: writing the synthetic demo study (issue 3 target: 3,000 images of 256x256 in <= 60 s on 2 cores).

Prints wall time, the CPU seconds the workers used (RUSAGE_CHILDREN, summed over processes) and the
machine's load, for the full demo (3,000 x 256, 2 workers) and the quick demo (500 x 128), plus a
single-process reference (render + write of 100 images in this process) to report the pool's speed-up
as a ratio: on a shared machine wall time alone says little.

    /work/venv/bin/python benchmarks/bench_demodata.py [--images 3000] [--size 256] [--workers 2] [--skip-quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.demodata.generate import generate_study


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(label: str, root: Path, **kw) -> dict:
    out = root / label
    c0, s0, l0 = _children_cpu(), _self_cpu(), os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = generate_study(out, **kw)
    wall = time.perf_counter() - t0
    cpu = (_children_cpu() - c0) + (_self_cpu() - s0)
    n = summary["n_images"] + summary["adapt"]["patients"]
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    res = {"label": label, "images": n, "wall_s": wall, "cpu_s": cpu, "img_per_s": n / wall,
           "cpu_ms_per_img": 1000 * cpu / n, "files": summary["files"], "MiB": size_mb,
           "load_before": l0, "load_after": os.getloadavg()[0]}  # fmt: skip
    print(f"{label:>28}: {n} images in {wall:.1f} s wall ({n / wall:.0f} img/s), {cpu:.1f} CPU-s "
          f"({1000 * cpu / n:.1f} CPU-ms/img), {summary['files']} files, {size_mb:.0f} MiB, "
          f"load {l0:.1f}->{res['load_after']:.1f}", flush=True)  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-quick", action="store_true")
    a = ap.parse_args()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, affinity {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 'n/a'}, python {platform.python_version()}")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="bench_demodata_"))
    try:
        ref = run("reference: 100 imgs, 1 proc", root, n_images=100, size=a.size, workers=1, min_per_finding=2,
                  adapt_support_per_class=0, adapt_query_per_class=0)  # fmt: skip
        full = run(f"full: {a.images}x{a.size}, {a.workers} workers", root, n_images=a.images, size=a.size,
                   workers=a.workers)  # fmt: skip
        print(f"pool speed-up vs the single-process reference: {ref['wall_s'] / ref['images'] * full['images'] / full['wall_s']:.2f}x "
              f"(wall), CPU per image {full['cpu_ms_per_img'] / ref['cpu_ms_per_img']:.2f}x of the reference")  # fmt: skip
        print(f"target: {a.images} images in <= 60 s -> {'MET' if full['wall_s'] <= 60 else 'NOT met'} "
              f"({full['wall_s']:.1f} s wall; CPU-bound estimate on 2 idle cores: {full['cpu_s'] / 2:.1f} s)")  # fmt: skip
        if not a.skip_quick:
            run(
                "quick: 500x128, floor 20",
                root,
                n_images=500,
                size=128,
                workers=a.workers,
                min_per_finding=20,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
