"""Real MAML meta-training through the engine's `MetaLearner`, single-process or under torchrun.

Used by tests/scaleout/test_distributed_e2e.py (both the reference run, in-process, and the 2-rank run,
launched as `torchrun ... tests/scaleout/maml_worker.py`) and by benchmarks/bench_distributed.py.

Tasks: 2-way 1-shot (3 query per class) on 16x16 one-channel images. Each task draws two random class
prototypes (smooth blobs at random positions); an example is its class prototype plus Gaussian noise, so
tasks are learnable from one shot but every task is new. Everything is drawn from ONE numpy Generator
seeded identically on every rank; each rank keeps its shard of the meta-batch (the pattern the meta-train
stage follows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from pipeline import distributed as D
from pipeline.errors import FewscanError
from pipeline.meta.algorithms import InnerConfig, MetaLearner, make_algorithm
from pipeline.meta.models import ModelSpec, build_model

SIZE = 16
N_WAY, K_SHOT, Q_QUERY = 2, 1, 3
Task = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class RunSpec:
    """One meta-training configuration (several can share one torchrun launch)."""

    name: str
    method: str = "maml"
    second_order: bool = False
    dtype: str = "float32"
    optimizer: str = "adam"  # adam | sgd
    outer_lr: float = 0.01
    inner_steps: int = 2
    steps: int = 4
    meta_batch: int = 5
    seed: int = 7
    filters: int = 8
    blocks: int = 2


# The configurations the parity test checks: second-order MAML (float32, SGD with momentum) and MAML++
# (learned per-layer-per-step inner rates, i.e. more parameters to all-reduce; first order) with Adam in
# float64. Adam divides by the gradient's own scale, so float32 rounding noise on gradients that are zero
# in exact arithmetic (conv biases before GroupNorm) would be blown up to a sizeable step in either run;
# float64 keeps that noise negligible, so the comparison tests the gradients, not the rounding.
PARITY_SPECS = (
    RunSpec("maml2_f32_sgd", method="maml", second_order=True, optimizer="sgd", outer_lr=0.05, steps=2),
    RunSpec("mamlpp_f64_adam", method="mamlpp", dtype="float64", optimizer="adam", steps=3, inner_steps=3),
)


# a cheap first-order run for the failure tests (what fails matters, not the maths)
LIGHT_SPECS = (RunSpec("fomaml_light", method="fomaml", steps=3, meta_batch=4, inner_steps=1),)
# the benchmark's configurations: Conv-4 with 32 filters x 4 blocks, meta-batch 16, 3 inner steps,
# first-order and second-order MAML (same communication, twice-ish the compute per task)
BENCH_SPECS = (
    RunSpec("bench_fomaml", method="fomaml", steps=5, meta_batch=16, inner_steps=3, filters=32, blocks=4),
    RunSpec(
        "bench_maml2",
        method="maml",
        second_order=True,
        steps=4,
        meta_batch=16,
        inner_steps=3,
        filters=32,
        blocks=4,
    ),
)
SPECS = {"parity": PARITY_SPECS, "light": LIGHT_SPECS, "bench": BENCH_SPECS}


def _blob(rng: np.random.Generator) -> np.ndarray:
    """A random smooth prototype image (SIZE, SIZE): two Gaussian bumps of random sign and position."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    img = np.zeros((SIZE, SIZE))
    for _ in range(2):
        cy, cx = rng.uniform(2, SIZE - 2, size=2)
        s = rng.uniform(1.5, 3.5)
        img += rng.choice([-1.0, 1.0]) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return img


def sample_task(rng: np.random.Generator, noise: float = 1.0) -> Task:
    """x_s (N_WAY*K, 1, S, S), y_s (N_WAY*K,), x_q (N_WAY*Q, 1, S, S), y_q (N_WAY*Q,)."""
    protos = [_blob(rng) for _ in range(N_WAY)]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        xs = [protos[c] + noise * rng.standard_normal((SIZE, SIZE)) for c in range(N_WAY) for _ in range(n)]
        ys = [c for c in range(N_WAY) for _ in range(n)]
        return np.stack(xs)[:, None], np.asarray(ys, dtype=np.int64)

    x_s, y_s = draw(K_SHOT)
    x_q, y_q = draw(Q_QUERY)
    return x_s, y_s, x_q, y_q


def stack(tasks: Sequence[Task], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A meta-batch (T, ...) of equal-shape tasks as tensors."""
    x_s, y_s, x_q, y_q = (np.stack([t[i] for t in tasks]) for i in range(4))
    return (
        torch.from_numpy(x_s).to(dtype),
        torch.from_numpy(y_s),
        torch.from_numpy(x_q).to(dtype),
        torch.from_numpy(y_q),
    )


def make_learner(spec: RunSpec, init_seed: int) -> MetaLearner:
    dtype = getattr(torch, spec.dtype)
    model_spec = ModelSpec(
        backbone="conv4", filters=spec.filters, blocks=spec.blocks, norm="group", norm_groups=4, head="shared"
    )  # a meta-learned head, so every learner parameter receives a (compared) meta-gradient
    with torch.random.fork_rng():  # the init draws from torch's global generator: fork it, seed it explicitly
        torch.manual_seed(init_seed)
        model = build_model(model_spec, 1, (SIZE, SIZE))
        inner = InnerConfig(steps=spec.inner_steps, lr=0.05, second_order=spec.second_order)
        learner = MetaLearner(model, make_algorithm(spec.method, inner), inner)
    return learner.to(dtype)


def train(
    spec: RunSpec,
    ctx: D.DistContext,
    *,
    fail_rank: int | None = None,
    fail_step: int = 1,
    fail_mode: str = "raise",
    step_times: list[float] | None = None,
) -> tuple[MetaLearner, list[float]]:
    """`spec.steps` outer steps; returns the learner and the meta-batch mean query loss per step
    (the single-process value on every rank). Appends each step's wall time to `step_times`."""
    dtype = getattr(torch, spec.dtype)
    rng = np.random.default_rng(spec.seed)  # identical stream on every rank
    # Each rank initialises differently on purpose: broadcast_state must make them equal to rank 0's.
    learner = make_learner(spec, init_seed=1000 + ctx.rank)
    D.broadcast_state(learner, ctx)
    D.assert_in_sync(learner, ctx, "initial weights")
    params = [p for p in learner.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if spec.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=spec.outer_lr)
    else:
        opt = torch.optim.SGD(params, lr=spec.outer_lr, momentum=0.9)
    losses: list[float] = []
    for step in range(spec.steps):
        t_step = time.perf_counter()
        if fail_rank == ctx.rank and step == fail_step:
            if fail_mode == "raise":
                raise RuntimeError(f"injected failure on rank {ctx.rank} at step {step}")
            if fail_mode == "exit":
                os._exit(3)  # dies without cleanup, like an OOM kill
            time.sleep(3600)  # "hang": alive but never reaches the next collective
        tasks = [sample_task(rng) for _ in range(spec.meta_batch)]  # the WHOLE meta-batch, every rank
        local = D.shard(tasks, ctx)
        weight = D.shard_weight(len(tasks), ctx)
        opt.zero_grad(set_to_none=True)
        loss_v = 0.0
        if local:  # a rank can get no task when meta_batch < world_size
            loss, _acc = learner.meta_loss(*stack(local, dtype), n_way=N_WAY, progress=step / spec.steps)
            loss.backward()
            loss_v = float(loss.detach())
        D.average_gradients(params, ctx, weight)
        opt.step()
        losses.append(D.weighted_mean({"loss": loss_v}, ctx, weight)["loss"])
        if step_times is not None:
            step_times.append(time.perf_counter() - t_step)
    D.assert_in_sync(learner, ctx, "final weights")
    return learner, losses


@record  # torchrun's failure summary then shows this rank's exception, not "To enable traceback see ..."
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, help="folder for <spec>.pt (rank 0)")
    ap.add_argument("--specs", choices=sorted(SPECS), default="parity")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--meta-batch", type=int, default=None)
    ap.add_argument("--fail-rank", type=int, default=None)
    ap.add_argument("--fail-step", type=int, default=1)
    ap.add_argument("--fail-mode", choices=("raise", "exit", "hang"), default="raise")
    args = ap.parse_args(argv)
    specs = list(SPECS[args.specs])
    if args.steps is not None or args.meta_batch is not None:
        specs = [
            RunSpec(
                **{
                    **s.__dict__,
                    "steps": args.steps or s.steps,
                    "meta_batch": args.meta_batch or s.meta_batch,
                }
            )
            for s in specs
        ]
    try:
        ctx = D.init_from_env()
        for spec in specs:
            times: list[float] = []
            learner, losses = train(
                spec,
                ctx,
                fail_rank=args.fail_rank,
                fail_step=args.fail_step,
                fail_mode=args.fail_mode,
                step_times=times,
            )
            ctx.barrier(f"end of {spec.name}")
            # throughput after the first (warm-up) step; every step ends in the same all-reduce, so rank 0's
            # step times are the job's
            timed = times[1:] or times
            dt = sum(timed)
            tasks_s = len(timed) * spec.meta_batch / dt
            if ctx.is_main:
                print(
                    f"RESULT {spec.name} world={ctx.world_size} threads={torch.get_num_threads()} "
                    f"steps={spec.steps} meta_batch={spec.meta_batch} tasks_per_s={tasks_s:.3f} "
                    f"losses={[round(v, 4) for v in losses]}",
                    flush=True,
                )
                if args.out:
                    args.out.mkdir(parents=True, exist_ok=True)
                    tmp = args.out / f".{spec.name}.pt.tmp"
                    torch.save({"state": learner.state_dict(), "losses": losses, "tasks_per_s": tasks_s}, tmp)
                    os.replace(tmp, args.out / f"{spec.name}.pt")
        ctx.shutdown()
    except FewscanError as err:  # as the CLI does: one line, exit 2
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
