"""One rank of a 2-process job (started by tests/scaleout/test_distributed_e2e.py as two plain Python
processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set, the way a batch scheduler like `srun` would,
without torchrun) that exercises the primitives of `pipeline.distributed` and writes what it saw to
<out>/rank<r>.json for the test to check.

--mode ok    : the checks below.
--mode exit  : rank 1 dies (os._exit) before the all-reduce; rank 0 must fail with a clear message.
--mode hang  : rank 1 sleeps instead of reaching the all-reduce; rank 0 must time out with a clear message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from pipeline import distributed as D
from pipeline.errors import FewscanError


def checks(ctx: D.DistContext) -> dict:
    r = ctx.rank
    out: dict = {"rank": r, "world": ctx.world_size, "backend": ctx.backend, "is_main": ctx.is_main}

    # Uneven meta-batch of 5 tasks: rank 0 takes 3, rank 1 takes 2. Each rank's grad is the mean over its
    # own tasks; per-task gradient of task t is the constant vector (t + 1).
    n = 5
    out["shard"] = D.shard(list(range(n)), ctx)
    w = D.shard_weight(n, ctx)
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2, 2))  # gets a gradient on rank 1 only
    c = nn.Parameter(torch.zeros(1))  # gets a gradient on no rank
    a.grad = torch.full((3,), sum(t + 1.0 for t in out["shard"]) / len(out["shard"]))
    if r == 1:
        b.grad = torch.ones(2, 2) * 10.0
    D.average_gradients([a, b, c], ctx, w)
    out["a_grad"] = a.grad.tolist()
    out["b_grad"] = b.grad.tolist() if b.grad is not None else None
    out["c_grad_is_none"] = c.grad is None

    # Meta-batch of 1 < world 2: rank 1 gets no task and contributes weight 0 (its stale grad ignored).
    one = D.shard(["only"], ctx)
    d = nn.Parameter(torch.zeros(2))
    d.grad = torch.tensor([4.0, -2.0]) if one else torch.tensor([999.0, 999.0])
    D.average_gradients([d], ctx, D.shard_weight(1, ctx))
    out["small_batch_shard"] = one
    out["d_grad"] = d.grad.tolist()

    # Metrics: the meta-batch mean of per-rank means, weighted.
    out["mean"] = D.weighted_mean({"loss": 1.0 if r == 0 else 2.0, "acc": 0.5}, ctx, w)

    # broadcast_state: rank-dependent module and dict (two dtypes) become rank 0's.
    with torch.random.fork_rng():
        torch.manual_seed(100 + r)
        m = nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3))
    m.register_buffer("count", torch.tensor([r + 7], dtype=torch.int64))
    D.broadcast_state(m, ctx)
    out["module_digest"] = D.state_digest(m)
    out["module_count"] = int(m.count.item())
    sd = {"w": torch.full((2,), float(r)), "step": torch.tensor(r * 10)}
    D.broadcast_state(sd, ctx)
    out["dict"] = [sd["w"].tolist(), int(sd["step"])]
    out["object"] = D.broadcast_object({"resume_step": 42, "from": r} if r == 0 else None, ctx)
    out["in_sync"] = D.assert_in_sync(m, ctx, "test weights")

    # Divergent weights are caught.
    with torch.no_grad():
        m[0].bias.add_(float(r))
    try:
        D.assert_in_sync(m, ctx, "diverged weights")
        out["divergence_caught"] = False
    except D.DistributedError as err:
        out["divergence_caught"] = "differ between ranks" in str(err)
    ctx.barrier("end of checks")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=("ok", "exit", "hang"), default="ok")
    args = ap.parse_args()
    try:
        ctx = D.init_from_env()
        if args.mode == "ok":
            res = checks(ctx)
        else:
            ctx.barrier("start")
            if ctx.rank == 1:
                if args.mode == "exit":
                    os._exit(3)
                time.sleep(3600)
            p = nn.Parameter(torch.zeros(3))
            p.grad = torch.ones(3)
            t0 = time.monotonic()
            try:
                D.average_gradients([p], ctx, 0.5)
            finally:
                print(f"rank {ctx.rank}: all-reduce returned after {time.monotonic() - t0:.1f} s", flush=True)
            res = {"rank": ctx.rank, "unexpected": "the all-reduce succeeded"}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{ctx.rank}.json").write_text(json.dumps(res))
        ctx.shutdown()
    except FewscanError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
