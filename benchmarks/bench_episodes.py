"""Benchmark of the episodes stage (issue 5). Prints its figures; never part of the test run.

1. Scale: a synthetic scan index the size of NIH ChestX-ray14 (112,120 images, 30,805 patients,
   14 findings + normal, multi-label, findings clustered within patients). Times
   (a) parsing the index + the condition split + patient pools,
   (b) (a) + 600 fixed test episodes of one setting (the issue's target: <= 10 s),
   (c) the whole default-shaped suite: binary + 3-way, k in {1, 5}, q 15, 600 test and 100 val
       episodes per (kind, k), the leakage audit and writing split.json / *.jsonl / audit,
   (d) on-the-fly meta-training episodes per second (TrainSampler).
2. Meta-batch assembly: a memory-mapped float16 store of 128x128 images; 8 episodes of 5-way 5-shot
   15-query (800 images) -> tensors with `stack_episodes`, with the page cache dropped for the store
   file first (cold: posix_fadvise DONTNEED) and warm; against one meta-training step of the project's
   own engine (pipeline.meta MetaLearner, MAML, default Conv-4 and inner loop) on that batch, same process.

Usage: python benchmarks/bench_episodes.py [--repeats 3] [--store-images 20000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.episodes.build import build_episodes, write_outputs  # noqa: E402
from pipeline.episodes.config import EpisodesConfig  # noqa: E402
from pipeline.episodes.labels import LabelTable  # noqa: E402
from pipeline.episodes.sampler import EpisodeSampler, TrainSampler, fixed_episodes  # noqa: E402
from pipeline.episodes.split import build_split  # noqa: E402
from pipeline.episodes.synthetic import NIH_COUNTS, NIH_IMAGES, NIH_PATIENTS, NORMAL, synthetic_index  # noqa: E402

RARE = ["Hernia", "Pneumonia", "Fibrosis", "Edema"]  # the four rarest ChestX-ray14 findings
VALIDATION = ["Emphysema", "Cardiomegaly", "Pleural_Thickening"]  # the next three; 7 common remain


def suite(**over) -> EpisodesConfig:
    base = dict(
        split={"rare": RARE, "validation": VALIDATION},
        kinds=["binary", "n_way"],
        n_way=3,
        k_shot=[1, 5],
        q_query=15,
        val_episodes=100,
        test_episodes=600,
        seed=0,
    )
    base.update(over)
    return EpisodesConfig.model_validate(base)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    out, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t0)
    return out, result


def fmt(ts: list[float]) -> str:
    return f"min {min(ts):.3f} s, median {statistics.median(ts):.3f} s (n={len(ts)})"


def bench_scale(repeats: int) -> None:
    t0 = time.perf_counter()
    df = synthetic_index(NIH_IMAGES, NIH_PATIENTS, seed=0)
    print(
        f"synthetic ChestX-ray14-sized index: {len(df)} images, {df.patient_key.nunique()} patients, "
        f"{len(NIH_COUNTS)} findings, {(df.labels.str.contains('|', regex=False)).mean():.1%} multi-label "
        f"(built in {time.perf_counter() - t0:.1f} s, not timed below)"
    )
    meta = {"normal_label": NORMAL, "label_names": sorted(NIH_COUNTS) + [NORMAL]}
    cfg = suite()

    def split_only():
        table = LabelTable.from_index(df, NORMAL, meta["label_names"])
        return table, build_split(table, cfg)[0]

    ts, (table, split) = timed(split_only, repeats)  # type: ignore[misc]
    print(f"(a) parse index + split + pools:                       {fmt(ts)}")
    one = suite(kinds=["n_way"], k_shot=5, val_episodes=0)

    def split_and_600():
        table = LabelTable.from_index(df, NORMAL, meta["label_names"])
        sp, _ = build_split(table, one)
        return fixed_episodes(EpisodeSampler(sp, df, one, "test", table=table), 600, one.seed)

    ts, eps = timed(split_and_600, repeats)
    print(f"(b) (a) + 600 test episodes (3-way 5-shot 15-query):   {fmt(ts)}   target <= 10 s")

    def full():
        built = build_episodes(df, meta, cfg)
        with tempfile.TemporaryDirectory() as d:
            write_outputs(built, Path(d))
        return built

    ts, built = timed(full, repeats)
    n_test, n_val = len(built.test), len(built.val)  # type: ignore[attr-defined]
    print(
        f"(c) full suite ({n_test} test + {n_val} val episodes, audit, files): {fmt(ts)}; "
        f"audit passed: {built.audit['passed']}"
    )  # type: ignore[attr-defined]
    sampler = TrainSampler(split, df, cfg, table=table)
    rng = np.random.default_rng(0)
    sampler.sample_batch(rng, 8, "n_way", 5)  # warm the per-class-set cache
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n // 8):
        sampler.sample_batch(rng, 8)
    dt = time.perf_counter() - t0
    print(
        f"(d) TrainSampler: {n / dt:,.0f} episodes/s ({dt / (n // 8) * 1e3:.2f} ms per meta-batch of 8, "
        "mixed kinds and k)"
    )


def bench_batch(repeats: int, store_images: int, step_repeats: int, vmap: bool) -> None:
    import torch

    from pipeline.episodes.batch import stack_episodes
    from pipeline.ingest.store import ImageStore

    n_pat = int(store_images / (NIH_IMAGES / NIH_PATIENTS))
    df = synthetic_index(store_images, n_pat, seed=1)
    # 5-way episodes from the 8 common findings (rare: the six rarest), as meta-training draws them
    six = RARE + VALIDATION[:2]
    cfg = suite(
        kinds=["n_way"], n_way=5, k_shot=5, split={"rare": six}, val_episodes=0, on_insufficient="drop"
    )
    table = LabelTable.from_index(df, NORMAL)
    split, _ = build_split(table, cfg)
    sampler = TrainSampler(split, df, cfg, table=table)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        path = Path(d) / "images.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(store_images, 1, 128, 128))
        rng = np.random.default_rng(0)
        for s in range(0, store_images, 2000):  # fill in blocks: flat memory
            e = min(s + 2000, store_images)
            arr[s:e] = rng.standard_normal((e - s, 1, 128, 128), dtype=np.float32).astype(np.float16)
        arr.flush()
        del arr
        size_mb = path.stat().st_size / 2**20
        store = ImageStore(np.load(path, mmap_mode="r"), df, {"normal_label": NORMAL})
        print(f"store: {store_images} images x (1, 128, 128) float16 = {size_mb:.0f} MiB memmap")

        def drop_cache() -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

        batches = [
            sampler.sample_batch(np.random.default_rng(100 + i), 8, "n_way", 5) for i in range(repeats + 1)
        ]
        ts_sample, _ = timed(lambda: sampler.sample_batch(np.random.default_rng(7), 8, "n_way", 5), repeats)
        cold, warm = [], []
        for b in batches[1:]:
            drop_cache()
            t0 = time.perf_counter()
            x_s, y_s, x_q, y_q = stack_episodes(b, store)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            x_s, y_s, x_q, y_q = stack_episodes(b, store)
            warm.append(time.perf_counter() - t0)
        print(
            f"meta-batch x_s {tuple(x_s.shape)}, x_q {tuple(x_q.shape)} float32 "
            f"({(x_s.numel() + x_q.numel()) * 4 / 2**20:.0f} MiB)"
        )
        print(f"sample 8 episodes (scan keys):       {fmt(ts_sample)}")
        print(f"assemble, page cache dropped (cold): {fmt(cold)}")
        print(f"assemble, warm page cache:           {fmt(warm)}")

        try:
            from pipeline.meta.algorithms import InnerConfig, MetaLearner, make_algorithm
            from pipeline.meta.models import ModelSpec, build_model
        except ImportError as err:
            print(f"meta-step reference unavailable ({err})")
            return
        torch.manual_seed(0)
        inner = InnerConfig(vmap=vmap)
        learner = MetaLearner(build_model(ModelSpec(), 1, (128, 128)), make_algorithm("maml", inner), inner)
        opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            loss, _ = learner.meta_loss(x_s, y_s, x_q, y_q, n_way=5)
            loss.backward()
            opt.step()

        ts_step, _ = timed(step, step_repeats)  # the first step included: a CPU meta-step takes long enough
        print(
            f"meta-step (MAML, Conv-4 {ModelSpec().filters} filters, {inner.steps} inner steps, "
            f"second_order={inner.second_order}, vmap={inner.vmap}): {fmt(ts_step)}"
        )
        print(
            f"ratio assembly / meta-step: cold {statistics.median(cold) / statistics.median(ts_step):.3f}, "
            f"warm {statistics.median(warm) / statistics.median(ts_step):.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--store-images", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the meta-step reference")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--step-repeats", type=int, default=1, help="meta-steps to time (each is slow on a CPU)")
    ap.add_argument(
        "--no-vmap", action="store_true", help="meta-step reference loops over tasks instead of vmap"
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"numpy {np.__version__}, pandas {pd.__version__}, torch {torch.__version__} ({args.threads} threads)"
    )
    bench_scale(args.repeats)
    if not args.skip_batch:
        bench_batch(args.repeats, args.store_images, args.step_repeats, not args.no_vmap)


if __name__ == "__main__":
    main()
