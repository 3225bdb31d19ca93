"""Benchmark of the evaluate stage (issue 8 target: one method on 600 episodes of the demo configuration
in <= 2 minutes on this 2-core CPU). Prints its figures; never part of the test run.

Setting: 600 binary episodes, k-shot 5, 15 query scans per class, 1×64×64 images read from an
in-memory float16 store through `episode_arrays` (as the stage does), Conv-4 (32 filters, GroupNorm).
The weights are untrained: speed does not depend on them.

Measured, each as wall time for all episodes (adapt on the support set + predict the query set +
per-episode metrics), episodes/s:
  maml        engine GradientMethod, `--steps` inner steps (default 5) through `inner.adapt`
  protonet    engine ProtoNetMethod (embed support + query)
  ft-head     HeadOnlyMethod, 10 steps on frozen features
  ft-whole    whole-network fine-tuning, 10 steps (GradientMethod, zero head)
  reference   the same `--steps` MAML adaptation written the learn2learn / higher way: a Python loop of
              torch.autograd.grad on module parameters cloned per episode (no torch.func)
and the ratio maml / reference. Also: the 0..10-step adaptation curve via one trajectory per episode vs
one fit per step count (11 fits), on `--curve-episodes` episodes.

    /work/venv/bin/python benchmarks/bench_evaluate.py [--episodes 600] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.episodes.batch import episode_arrays
from pipeline.episodes.episode import Episode
from pipeline.evaluate import baselines, runner
from pipeline.meta.methods import GradientMethod, ProtoNetMethod
from pipeline.meta.models import ModelSpec, build_model


class MemStore:
    def __init__(self, images: np.ndarray):
        self.images = images
        n = images.shape[0]
        self.index = pd.DataFrame({"scan_key": [f"{i:016x}" for i in range(n)], "store_index": np.arange(n)})


def make_episodes(n: int, k: int, q: int, n_images: int, seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    eps = []
    for i in range(n):
        pick = rng.choice(n_images, size=2 * (k + q), replace=False)
        keys = [f"{j:016x}" for j in pick]
        eps.append(
            Episode(
                id=i,
                kind="binary",
                k_shot=k,
                classes=["cond", "normal"],
                support={"cond": keys[:k], "normal": keys[k : 2 * k]},
                query={"cond": keys[2 * k : 2 * k + q], "normal": keys[2 * k + q :]},
            )
        )
    return eps


class ReferenceMAML:
    """MAML test-time adaptation the way learn2learn/higher examples write it: clone the parameters,
    loop torch.autograd.grad steps, forward with the fast weights via torch.func.functional_call."""

    name = "reference"

    def __init__(self, model, steps: int, lr: float):
        self.model, self.steps, self.lr = model, steps, lr

    def fit(self, x_s, y_s, n_way, steps=None):
        with torch.enable_grad():
            p = {k: v.detach().clone().requires_grad_(True) for k, v in self.model.task_params(n_way).items()}
            for _ in range(self.steps if steps is None else steps):
                loss = F.cross_entropy(torch.func.functional_call(self.model, p, (x_s,)), y_s)
                g = torch.autograd.grad(loss, list(p.values()))
                p = {k: (v - self.lr * gi).detach().requires_grad_(True) for (k, v), gi in zip(p.items(), g)}
        return {k: v.detach() for k, v in p.items()}

    def predict_proba(self, adapted, x):
        with torch.no_grad():
            return torch.softmax(torch.func.functional_call(self.model, adapted, (x,)), -1)


def timed(label: str, method, eps, load, steps=None) -> float:
    t0 = time.perf_counter()
    res = runner.run_episodes(method, eps, load, steps=steps, desc=label)
    dt = time.perf_counter() - t0
    acc = np.mean([r.acc for r in res])
    print(
        f"{label:>10}: {len(eps)} episodes in {dt:6.1f} s  ({len(eps) / dt:5.1f} episodes/s, "
        f"{1000 * dt / len(eps):6.1f} ms/episode)  mean acc {acc:.3f}  load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--q", type=int, default=15)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--curve-episodes", type=int, default=50)
    ap.add_argument("--only", default="maml,reference,protonet,ft-head,ft-whole,curve")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, load {os.getloadavg()}"
    )
    print(
        f"setting: {args.episodes} binary episodes, k={args.k}, q={args.q}, 1x{args.size}x{args.size}, Conv-4 32 filters"
    )
    rng = np.random.default_rng(0)
    n_img = 3000
    store = MemStore(rng.normal(size=(n_img, 1, args.size, args.size)).astype(np.float16))
    eps = make_episodes(args.episodes, args.k, args.q, n_img)

    def load(ep):
        return episode_arrays(ep, store)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        spec = ModelSpec(filters=32, norm="group")
        meta_net = build_model(spec, 1, (args.size, args.size))
        zero_net = build_model(spec.model_copy(update={"head": "zero"}), 1, (args.size, args.size))
    maml = GradientMethod(meta_net, steps=args.steps, lr=0.1, name="maml")
    out = {}
    if "maml" in only:
        out["maml"] = timed("maml", maml, eps, load)
    if "reference" in only:
        out["reference"] = timed("reference", ReferenceMAML(meta_net, args.steps, 0.1), eps, load)
    if "maml" in out and "reference" in out:
        print(f"maml engine / reference speed ratio: {out['reference'] / out['maml']:.2f}x")
    if "protonet" in only:
        timed("protonet", ProtoNetMethod(meta_net), eps, load)
    if "ft-head" in only:
        timed("ft-head", baselines.HeadOnlyMethod("ft-head", zero_net, 0.01, 10), eps, load)
    if "ft-whole" in only:
        timed("ft-whole", baselines.whole_network_method("ft-whole", zero_net, 0.01, 10), eps, load)
    if "curve" in only:
        ce = eps[: args.curve_episodes]
        t0 = time.perf_counter()
        runner.accuracy_by_steps(maml, ce, load, list(range(11)))
        traj = time.perf_counter() - t0

        class NoTraj:
            name = "maml-fits"
            fit = maml.fit
            predict_proba = maml.predict_proba

        t0 = time.perf_counter()
        runner.accuracy_by_steps(NoTraj(), ce, load, list(range(11)))
        fits = time.perf_counter() - t0
        print(
            f"curve 0..10 steps on {len(ce)} episodes: one trajectory {traj:.1f} s vs 11 fits {fits:.1f} s "
            f"({fits / traj:.1f}x)"
        )


if __name__ == "__main__":
    main()
