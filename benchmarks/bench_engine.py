"""Meta-training throughput of the engine against a learn2learn/higher-style reference, in one process.

Reference ("l2l-style"): a Python loop over the tasks of a meta-batch; per task the parameters are
cloned, each inner step is `torch.autograd.grad(loss, params, create_graph=second_order)` followed by
`p - lr * g`, the query loss is back-propagated per task (as learn2learn's MAML examples do).
Ours: `pipeline.meta.algorithms.MetaLearner.meta_loss` — the one functional inner loop
(`functional_call` + `torch.func.grad`) vmapped over the tasks, one backward for the meta-batch.
Both run the same network, data, inner steps and learning rate, and their meta-gradients are checked to
agree before timing.

Configurations:
  A: Conv-4 (64 filters), 5-way 1-shot, 15 query/class, 28x28, 5 inner steps, meta-batch 8, second order.
  B: the demo configuration (64x64, 1 channel, see DEMO below).
Also: peak extra memory (RSS high-water mark in a fresh subprocess) of first order / second order /
checkpointed second order, and achieved FLOP/s (torch.utils.flop_counter) against a matmul peak measured
in the same run.

usage: python benchmarks/bench_engine.py [--quick] [--threads N] [--repeats R] [--only A|B|mem|flops]
Never part of the test run: the machine is shared and noisy; ratios are measured interleaved.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.meta.algorithms import InnerConfig, MetaLearner, make_algorithm  # noqa: E402
from pipeline.meta.models import ModelSpec, build_model  # noqa: E402

CONFIGS = {
    "A": {
        "spec": {"filters": 64, "norm": "group"},
        "size": 28,
        "n_way": 5,
        "k": 1,
        "q": 15,
        "steps": 5,
        "lr": 0.4,
        "meta_batch": 8,
        "method": "maml",
        "second_order": True,
    },
    # The demo defaults (tasks/demo.yaml meta_train section): binary episodes dominate, 5-shot is the
    # larger of the k values; 3 inner steps first order, meta-batch 4, q_query 5 for training.
    "B": {
        "spec": {"filters": 32, "norm": "group"},
        "size": 64,
        "n_way": 2,
        "k": 5,
        "q": 5,
        "steps": 3,
        "lr": 0.1,
        "meta_batch": 4,
        "method": "maml",
        "second_order": False,
    },
}


def make_batch(c: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t, n, k, q, s = c["meta_batch"], c["n_way"], c["k"], c["q"], c["size"]
    xs = torch.randn(t, n * k, 1, s, s, generator=g)
    xq = torch.randn(t, n * q, 1, s, s, generator=g)
    ys = torch.arange(n).repeat_interleave(k).repeat(t, 1)
    yq = torch.arange(n).repeat_interleave(q).repeat(t, 1)
    return xs, ys, xq, yq


def make_learner(c: dict, checkpoint: bool = False, tasks: str = "auto") -> MetaLearner:
    torch.manual_seed(0)
    inner = InnerConfig(
        steps=c["steps"], lr=c["lr"], second_order=c["second_order"], checkpoint=checkpoint, tasks=tasks
    )
    model = build_model(ModelSpec(**c["spec"]), 1, (c["size"], c["size"]))
    return MetaLearner(model, make_algorithm(c["method"], inner), inner)


def ours_step(learner: MetaLearner, batch, n_way: int) -> None:
    for p in learner.parameters():
        p.grad = None
    learner.meta_backward(*batch, n_way)


def reference_step(
    learner: MetaLearner, batch, n_way: int, steps: int, lr: float, second_order: bool
) -> None:
    """learn2learn / higher style: loop over tasks, autograd.grad(create_graph) per inner step."""
    model = learner.model
    for p in learner.parameters():
        p.grad = None
    xs, ys, xq, yq = batch
    t = xs.shape[0]
    for i in range(t):
        params = model.task_params(n_way)  # the "clone": differentiable copy with the head for n_way
        names = list(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, params, (xs[i],)), ys[i])
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=second_order)
            params = {k: params[k] - lr * g for k, g in zip(names, grads)}
        qloss = F.cross_entropy(functional_call(model, params, (xq[i],)), yq[i]) / t
        qloss.backward()


def grads_of(learner: MetaLearner) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in learner.parameters() if p.grad is not None])


def time_pair(c: dict, repeats: int, iters: int) -> dict:
    """Interleaved timing of ours vs reference; returns tasks/s medians and the ratio."""
    learner = make_learner(c)
    batch = make_batch(c)
    n = c["n_way"]

    def ours():
        ours_step(learner, batch, n)

    def ref():
        reference_step(learner, batch, n, c["steps"], c["lr"], c["second_order"])

    ours()
    g_ours = grads_of(learner).clone()
    ref()
    g_ref = grads_of(learner).clone()
    rel = float((g_ours - g_ref).norm() / g_ref.norm().clamp_min(1e-12))
    threads = torch.get_num_threads()

    def ref1():  # the reference at one intra-op thread (its best setting on a loaded machine)
        torch.set_num_threads(1)
        try:
            ref()
        finally:
            torch.set_num_threads(threads)

    def ours_loop():  # our engine, tasks in a plain loop at the default threads
        learner.inner = learner.inner.model_copy(update={"tasks": "loop"})
        try:
            ours()
        finally:
            learner.inner = learner.inner.model_copy(update={"tasks": "auto"})

    t_ours, t_ref, t_ref1, t_loop = [], [], [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (ref, t_ref), (ref1, t_ref1), (ours_loop, t_loop)):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            acc.append((time.perf_counter() - t0) / iters)
    tasks = c["meta_batch"]
    mo, mr = statistics.median(t_ours), statistics.median(t_ref)
    mr1, ml = statistics.median(t_ref1), statistics.median(t_loop)
    return {
        "mode": learner.task_mode(torch.device("cpu")),
        "ours_tasks_per_s": tasks / mo,
        "ref_tasks_per_s": tasks / mr,
        "ref_1thread_tasks_per_s": tasks / mr1,
        "ours_loop_tasks_per_s": tasks / ml,
        "speedup": mr / mo,
        "speedup_vs_ref_1thread": mr1 / mo,
        "all_s_per_batch": {"ours": t_ours, "ref": t_ref, "ref_1thread": t_ref1, "ours_loop": t_loop},
        "ours_s_per_batch": mo,
        "ref_s_per_batch": mr,
        "grad_rel_diff": rel,
        "repeats": repeats,
        "iters": iters,
    }


def matmul_peak(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_of(c: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    # FlopCounterMode is a thread-local dispatch mode: count our engine in loop mode (the same per-task ops
    # as the task threads run), else the worker threads' FLOPs are invisible to it.
    learner = make_learner(c, tasks="loop")
    batch = make_batch(c)
    with FlopCounterMode(display=False) as fc:
        ours_step(learner, batch, c["n_way"])
    ours_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        reference_step(learner, batch, c["n_way"], c["steps"], c["lr"], c["second_order"])
    return {"ours_flops_per_batch": ours_flops, "ref_flops_per_batch": fc.get_total_flops()}


def _mem_child(cfg_name: str, mode: str) -> None:
    """Runs in a fresh process: peak RSS increase of one meta-step (KiB → MiB)."""
    c = dict(CONFIGS[cfg_name])
    ck = mode == "second_order_checkpointed"
    c["second_order"] = mode != "first_order"
    learner = make_learner(c, checkpoint=ck)
    batch = make_batch(c)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ours_step(learner, batch, c["n_way"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_extra_mib": (peak - base) / 1024}))


def mem_table(cfg_name: str) -> dict:
    out = {}
    for mode in ("first_order", "second_order", "second_order_checkpointed"):
        res = subprocess.run(
            [
                sys.executable,
                __file__,
                "--mem-child",
                cfg_name,
                mode,
                "--threads",
                str(torch.get_num_threads()),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if res.returncode != 0:
            out[mode] = f"failed: {res.stderr[-300:]}"
            continue
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--only", choices=["A", "B", "mem", "flops"], default=None)
    ap.add_argument("--mem-child", nargs=2, metavar=("CONFIG", "MODE"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mem_child:
        _mem_child(*a.mem_child)
        return
    print(
        f"# machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, python {platform.python_version()}"
    )
    results: dict = {"threads": torch.get_num_threads()}
    for name in ("A", "B"):
        if a.only in (None, name):
            r = time_pair(CONFIGS[name], a.repeats, a.iters)
            results[name] = r
            print(
                f"config {name}: ours ({r['mode']}) {r['ours_tasks_per_s']:.2f} tasks/s, reference "
                f"{r['ref_tasks_per_s']:.2f} tasks/s (x{r['speedup']:.2f}); reference at 1 thread "
                f"{r['ref_1thread_tasks_per_s']:.2f} (x{r['speedup_vs_ref_1thread']:.2f}); ours as a plain loop "
                f"{r['ours_loop_tasks_per_s']:.2f}; meta-grad rel diff {r['grad_rel_diff']:.1e}"
            )
    if a.only in (None, "flops"):
        peak = matmul_peak()
        for name in ("A", "B"):
            f = flops_of(CONFIGS[name])
            r = results.get(name) or time_pair(CONFIGS[name], 2, 1)
            ach = f["ours_flops_per_batch"] / r["ours_s_per_batch"]
            ach_ref = f["ref_flops_per_batch"] / r["ref_s_per_batch"]
            results[f"flops_{name}"] = {
                **f,
                "ours_flop_s": ach,
                "ref_flop_s": ach_ref,
                "matmul_peak_flop_s": peak,
            }
            print(
                f"config {name}: {f['ours_flops_per_batch'] / 1e9:.2f} GFLOP/batch (ref "
                f"{f['ref_flops_per_batch'] / 1e9:.2f}); achieved ours {ach / 1e9:.1f} GFLOP/s, ref "
                f"{ach_ref / 1e9:.1f} GFLOP/s; matmul peak {peak / 1e9:.1f} GFLOP/s "
                f"({100 * ach / peak:.0f}% / {100 * ach_ref / peak:.0f}%)"
            )
    if a.only in (None, "mem"):
        for name in ("A",):
            m = mem_table(name)
            results[f"mem_{name}"] = m
            print(f"config {name} peak extra memory of one meta-step (MiB): " + json.dumps(m))
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
