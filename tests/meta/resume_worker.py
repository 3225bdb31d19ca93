"""Subprocess worker of test_resume.py: meta-trains on a tiny world with checkpoints, optionally SIGKILLs
itself right after logging step `--kill-at` (between two checkpoints), and resumes from `last.pt` if present.

usage: python -m tests.meta.resume_worker WORLD CKPT_DIR METRICS.jsonl OUT_WEIGHTS.pt [--kill-at N] [--method M]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("world", type=Path)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("metrics", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--method", default="mamlpp")
    a = ap.parse_args()
    # two threads: the CPU default path runs the tasks of a meta-batch on worker threads (tasks=auto)
    torch.set_num_threads(2)

    from pipeline.artifacts import SplitFile, read_artifact
    from pipeline.episodes.batch import episode_arrays, stack_episodes
    from pipeline.episodes.episode import load_episodes
    from pipeline.episodes.sampler import TrainSampler
    from pipeline.ingest.store import ImageStore
    from pipeline.meta.algorithms import InnerConfig, MAMLPlusPlusConfig, MetaLearner, make_algorithm
    from pipeline.meta.models import ModelSpec, build_model
    from pipeline.meta.trainer import MetaTrainer, OuterConfig
    from pipeline.metatrain.config import MetaTrainConfig
    from pipeline.metatrain.stage import train_episodes_config

    store = ImageStore.open(a.world / "store")
    split = read_artifact(SplitFile, a.world / "episodes" / "split.json")
    sampler = TrainSampler(split, store.index, train_episodes_config(split, MetaTrainConfig()))
    val = []
    for ep in load_episodes(a.world / "episodes" / "episodes" / "val.jsonl"):
        val.append((*episode_arrays(ep, store), ep.n_way))

    torch.manual_seed(7)
    inner = InnerConfig(steps=2, lr=0.1, second_order=True)
    model = build_model(ModelSpec(filters=8, blocks=2), 1, (16, 16))
    learner = MetaLearner(
        model, make_algorithm(a.method, inner, MAMLPlusPlusConfig(derivative_order_anneal=0.5)), inner
    )
    cfg = OuterConfig(steps=10, lr=3e-3, warmup_steps=2, val_every=3, checkpoint_every=4)
    trainer = MetaTrainer(learner, cfg, seed=11)
    if (a.ckpt / "last.pt").is_file():
        trainer.load(a.ckpt / "last.pt")

    def sample(rng):
        eps = sampler.sample_batch(rng, 2)
        return (*stack_episodes(eps, store), eps[0].n_way)

    def on_metrics(row, step):
        with a.metrics.open("a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if a.kill_at is not None and step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.fit(sample, val_episodes=val, ckpt_dir=a.ckpt, on_metrics=on_metrics)
    torch.save({"learner": learner.state_dict(), "history": trainer.state.history}, a.out)


if __name__ == "__main__":
    main()
