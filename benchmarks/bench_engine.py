"""Meta-training throughput of the engine against a learn2learn/higher-style reference, in one process.

Reference ("l2l-style"): the network as learn2learn / higher users write it (`nn.Conv2d`, `nn.GroupNorm`,
`nn.ReLU`, `nn.MaxPool2d` in an `nn.Sequential`, like learn2learn's CNN4 with GroupNorm for BatchNorm) and
their inner loop: a Python loop over the tasks of a meta-batch; per task the parameters are cloned, each
inner step is `torch.autograd.grad(loss, params, create_graph=second_order)` followed by `p - lr * g`, the
query loss is back-propagated per task (as learn2learn's MAML examples do). torch's default intra-op threads.
Ours: `pipeline.meta.algorithms.MetaLearner.meta_backward` with fewscan's Conv4 — the one functional inner
loop, tasks spread over CPU task threads (`tasks: auto`), the backbone's CPU fast paths
(`pipeline/meta/fastops.py`: im2col convolution of the images without the unneeded input-gradient term,
GroupNorm with an analytic double backward, fused max-pool + ReLU; the last two in small C kernels compiled
on first use, `pipeline/meta/native.py`, whose status the run prints).
Both compute the same function from the same weights; the meta-gradients are checked to agree in float64
before timing. To separate the two sources of speed, the reference is also timed on fewscan's own network
("reference on our network"), and our engine as a plain loop at one thread. Where installed, the real
libraries are timed too: `higher` (pip install higher) and learn2learn's MAML (`--l2l-src DIR`: the
`learn2learn` folder of its sdist, whose Cython parts do not build on this Python; only the pure-Python
`algorithms/maml.py` and `utils` are loaded).

Configurations:
  A: Conv-4 (64 filters), 5-way 1-shot, 15 query/class, 28x28, 5 inner steps, meta-batch 8, second order.
  B: the demo configuration (64x64, 1 channel, see DEMO below).
Also: peak extra memory (RSS high-water mark in a fresh subprocess) of first order / second order /
checkpointed second order, and achieved FLOP/s (torch.utils.flop_counter) against a matmul peak measured
in the same run.

usage: python benchmarks/bench_engine.py [--threads N] [--repeats R] [--only A|B|mem|flops] [--l2l-src DIR]
Never part of the test run: the machine is shared and noisy; ratios are measured interleaved.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.meta import native  # noqa: E402
from pipeline.meta.algorithms import InnerConfig, MetaLearner, make_algorithm  # noqa: E402
from pipeline.meta.fastops import Conv2d2, GroupNorm2, MaxPoolReLU2  # noqa: E402
from pipeline.meta.models import FewShotNet, ModelSpec, build_model  # noqa: E402

CONFIGS = {
    "A": {
        # head: shared (one trainable row replicated per class), the head the reference implements; the
        # models' default is now head: proto (docs/evaluation.md), whose head is frozen and set from the
        # support set, which the learn2learn/higher-style loop has no notion of
        "spec": {"filters": 64, "norm": "group", "head": "shared"},
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
        "spec": {"filters": 32, "norm": "group", "head": "shared"},  # as A: the reference's head
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


def textbook_net(model: FewShotNet, head_rows: int = 1) -> nn.Sequential:
    """The same function and weights as fewscan's Conv4 `model`, written with the stock modules in the
    textbook order (conv -> GroupNorm -> ReLU -> max-pool), as learn2learn/higher users build it.
    `head_rows` = 1: the shared head row (replicated per task by `reference_step`, like ours);
    n: an explicit n-row head initialised with that row (for libraries that adapt module parameters)."""
    layers: list[nn.Module] = []
    for mod in model.backbone.features:  # type: ignore[union-attr]
        if isinstance(mod, GroupNorm2):
            gn = nn.GroupNorm(mod.num_groups, mod.num_channels, eps=mod.eps)
            gn.load_state_dict(mod.state_dict())
            layers.append(gn)
        elif isinstance(mod, Conv2d2):
            conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, padding=mod.padding)
            conv.load_state_dict(mod.state_dict())
            layers.append(conv)
        elif isinstance(mod, MaxPoolReLU2):
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
        elif isinstance(mod, nn.Identity):
            continue
        else:
            layers.append(copy.deepcopy(mod))
    head = nn.Linear(model.feat_dim, head_rows)
    with torch.no_grad():
        head.weight.copy_(model.head.weight.expand(head_rows, -1))
        head.bias.copy_(model.head.bias.expand(head_rows))
    return nn.Sequential(*layers, nn.Flatten(), head)


def reference_step(net: nn.Module, batch, n_way: int, steps: int, lr: float, second_order: bool) -> None:
    """learn2learn / higher style: loop over tasks, autograd.grad(create_graph) per inner step.

    `net`: a `textbook_net` (Sequential, last module the shared head row) or a fewscan `FewShotNet`."""
    for p in net.parameters():
        p.grad = None
    xs, ys, xq, yq = batch
    t = xs.shape[0]
    if isinstance(net, FewShotNet):
        head_w, head_b = "head.weight", "head.bias"
    else:
        last = len(net) - 1  # type: ignore[arg-type]
        head_w, head_b = f"{last}.weight", f"{last}.bias"
    for i in range(t):
        # the "clone": a differentiable copy, the head row replicated for n_way classes
        params = dict(net.named_parameters())
        params[head_w] = params[head_w].expand(n_way, -1)
        params[head_b] = params[head_b].expand(n_way)
        names = list(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(net, params, (xs[i],)), ys[i])
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=second_order)
            params = {k: params[k] - lr * g for k, g in zip(names, grads)}
        qloss = F.cross_entropy(functional_call(net, params, (xq[i],)), yq[i]) / t
        qloss.backward()


def higher_step(net: nn.Module, batch, steps: int, lr: float, second_order: bool) -> None:
    """The `higher` library itself: innerloop_ctx + differentiable SGD, per task (net: n-row head)."""
    import higher  # optional: pip install higher

    for p in net.parameters():
        p.grad = None
    xs, ys, xq, yq = batch
    t = xs.shape[0]
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for i in range(t):
        with higher.innerloop_ctx(net, opt, copy_initial_weights=False, track_higher_grads=second_order) as (
            fnet,
            diffopt,
        ):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fnet(xs[i]), ys[i]))
            (F.cross_entropy(fnet(xq[i]), yq[i]) / t).backward()


def load_l2l_maml(src: str):
    """learn2learn's MAML class from an unpacked sdist's `learn2learn` folder, without its Cython parts."""
    root = Path(src)
    for name, path in (("learn2learn", root), ("learn2learn.algorithms", root / "algorithms")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]  # type: ignore[attr-defined]
        sys.modules[name] = mod
    for name, path in (
        ("learn2learn.utils", root / "utils" / "__init__.py"),
        ("learn2learn.algorithms.base_learner", root / "algorithms" / "base_learner.py"),
        ("learn2learn.algorithms.maml", root / "algorithms" / "maml.py"),
    ):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["learn2learn.algorithms.maml"].MAML


def l2l_step(maml, batch, steps: int) -> None:
    """learn2learn's own MAML: clone() + adapt() per task (maml wraps an n-row-head textbook net)."""
    for p in maml.parameters():
        p.grad = None
    xs, ys, xq, yq = batch
    t = xs.shape[0]
    for i in range(t):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
        (F.cross_entropy(learner(xq[i]), yq[i]) / t).backward()


def grads_of(module: nn.Module, head_rows: int = 1) -> torch.Tensor:
    """The meta-gradient as one vector in parameter order; an n-row head is summed to the shared row."""
    gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
    if head_rows > 1:  # the last two parameters are the head's weight and bias
        gs[-2], gs[-1] = gs[-2].sum(0, keepdim=True), gs[-1].sum(0, keepdim=True)
    return torch.cat([g.reshape(-1) for g in gs])


def agreement(c: dict) -> dict:
    """Relative differences of the meta-gradients (norm of the difference over the norm).

    float64: ours vs the reference, i.e. the two compute the same function and derivative. float32: ours
    vs the reference, and each one's float32 result vs the float64 reference. In float32 the differences
    are dominated by max-pool ties: a rounding difference of 1e-7 between two nearly equal values in a
    pool window sends that window's gradient to the other pixel (both are valid subgradients); a query
    batch has hundreds of thousands of windows, so a few such flips per meta-batch are expected, and the
    inner loop amplifies them. Which flips happen depends on each engine's rounding (the reference's own
    float32 meta-gradient differs from its float64 one by as much on A)."""
    grads = {}
    for dtype in (torch.float64, torch.float32):
        learner = make_learner(c, tasks="loop").to(dtype)
        batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in make_batch(c))
        ours_step(learner, batch, c["n_way"])
        net = textbook_net(learner.model).to(dtype)
        reference_step(net, batch, c["n_way"], c["steps"], c["lr"], c["second_order"])
        grads[dtype] = (grads_of(learner).double(), grads_of(net).double())

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    (o64, r64), (o32, r32) = grads[torch.float64], grads[torch.float32]
    return {
        "float64": rel(o64, r64),
        "float32": rel(o32, r32),
        "ours_float32_vs_float64": rel(o32, r64),
        "ref_float32_vs_float64": rel(r32, r64),
    }


def time_pair(c: dict, repeats: int, iters: int, l2l_src: str | None = None) -> dict:
    """Interleaved timing of ours vs the references; returns tasks/s medians and the ratios."""
    learner = make_learner(c)
    batch = make_batch(c)
    n = c["n_way"]
    net = textbook_net(learner.model)
    threads = torch.get_num_threads()

    def at_one_thread(fn):
        def run():
            torch.set_num_threads(1)
            try:
                fn()
            finally:
                torch.set_num_threads(threads)

        return run

    def ours_loop():  # our engine, tasks in a plain loop at one thread
        learner.inner = learner.inner.model_copy(update={"tasks": "loop"})
        try:
            at_one_thread(lambda: ours_step(learner, batch, n))()
        finally:
            learner.inner = learner.inner.model_copy(update={"tasks": "auto"})

    fns = {
        "ours": lambda: ours_step(learner, batch, n),
        "ref": lambda: reference_step(net, batch, n, c["steps"], c["lr"], c["second_order"]),
        "ref_our_network": lambda: reference_step(
            learner.model, batch, n, c["steps"], c["lr"], c["second_order"]
        ),
        "ref_1thread": at_one_thread(
            lambda: reference_step(net, batch, n, c["steps"], c["lr"], c["second_order"])
        ),
        "ours_loop_1thread": ours_loop,
    }
    if importlib.util.find_spec("higher") is not None:
        net_n = textbook_net(learner.model, head_rows=n)
        fns["higher"] = lambda: higher_step(net_n, batch, c["steps"], c["lr"], c["second_order"])
    if l2l_src:
        maml = load_l2l_maml(l2l_src)(
            textbook_net(learner.model, head_rows=n), lr=c["lr"], first_order=not c["second_order"]
        )
        fns["learn2learn"] = lambda: l2l_step(maml, batch, c["steps"])
    for fn in fns.values():  # warm-up (allocator, oneDNN primitive caches)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times[k].append((time.perf_counter() - t0) / iters)
    tasks = c["meta_batch"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "mode": learner.task_mode(torch.device("cpu")),
        "tasks_per_s": {k: tasks / v for k, v in med.items()},
        "speedup": {k: v / med["ours"] for k, v in med.items() if k != "ours"},
        "s_per_batch": times,
        "ours_s_per_batch": med["ours"],
        "ref_s_per_batch": med["ref"],
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
        reference_step(textbook_net(learner.model), batch, c["n_way"], c["steps"], c["lr"], c["second_order"])
    return {"ours_flops_per_batch": ours_flops, "ref_flops_per_batch": fc.get_total_flops()}


def _peak_rss_kib() -> int:
    """This process's RSS high-water mark (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _mem_child(cfg_name: str, mode: str) -> None:
    """Runs in a fresh process: peak RSS increase of one meta-step (KiB → MiB).

    The high-water mark is reset first: a child forked from a large parent inherits the parent's mark across
    exec, which would hide the step's own peak (an earlier full run printed 0 MiB for that reason)."""
    c = dict(CONFIGS[cfg_name])
    ck = mode == "second_order_checkpointed"
    c["second_order"] = mode != "first_order"
    learner = make_learner(c, checkpoint=ck)
    batch = make_batch(c)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass
    base = _peak_rss_kib()
    ours_step(learner, batch, c["n_way"])
    peak = _peak_rss_kib()
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
    ap.add_argument(
        "--l2l-src", default=None, help="the learn2learn/ folder of an unpacked learn2learn sdist"
    )
    ap.add_argument("--mem-child", nargs=2, metavar=("CONFIG", "MODE"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mem_child:
        _mem_child(*a.mem_child)
        return
    print(
        f"# machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, python {platform.python_version()}, "
        f"CPU kernels {native.status()} (AVX-512 pool: {native.pool_simd()})"
    )
    results: dict = {"threads": torch.get_num_threads()}
    for name in ("A", "B"):
        if a.only in (None, name):
            agree = agreement(CONFIGS[name])
            r = time_pair(CONFIGS[name], a.repeats, a.iters, a.l2l_src)
            r["grad_rel_diff"] = agree
            results[name] = r
            tps, sp = r["tasks_per_s"], r["speedup"]
            others = ", ".join(f"{k} {tps[k]:.2f} (x{sp[k]:.2f})" for k in tps if k not in ("ours", "ref"))
            print(
                f"config {name}: ours ({r['mode']}) {tps['ours']:.2f} tasks/s, reference {tps['ref']:.2f} tasks/s "
                f"(x{sp['ref']:.2f}); {others}; meta-grad rel diff float64 {agree['float64']:.1e}, "
                f"float32 {agree['float32']:.1e}; float32 error vs the float64 reference: ours "
                f"{agree['ours_float32_vs_float64']:.1e}, reference {agree['ref_float32_vs_float64']:.1e}"
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
