"""The real meta-train stage (`pipeline.metatrain.stage.execute`) on the tiny world of tests/metatrain,
single-process or as one rank under torchrun: rank 0 records into a FakeRun folder, the other ranks get
`FollowerRun`. Used by test_metatrain_distributed.py.

    python tests/scaleout/stage_worker.py ROOT build         # write the world once
    python tests/scaleout/stage_worker.py ROOT OUT           # train (under torchrun or not)
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from pipeline import distributed
from pipeline.errors import FewscanError
from pipeline.metatrain import stage
from tests.metatrain.test_stage import FakeRun, _cfg, _upstream
from tests.metatrain.world import build_world


@record
def main(argv: list[str]) -> int:
    root = Path(argv[0])
    if argv[1:] == ["build"]:
        build_world(root / "world")
        return 0
    out = Path(argv[1])
    world = {"store": root / "world" / "store", "episodes": root / "world" / "episodes"}
    try:
        ctx = distributed.init_from_env()
        # meta-batch 3 over 2 ranks: 2 + 1 tasks
        # a meta-learned (shared) head: every learner tensor is then trained, which the test's weight check
        # relies on (a proto head is not a meta-parameter)
        cfg = _cfg(
            methods=["maml", "mamlpp"],
            meta_batch=3,
            outer={"steps": 4, "lr": 3e-3, "warmup_steps": 0},
            model={"filters": 8, "blocks": 2, "head": "shared"},
        )
        run = FakeRun(out) if ctx.is_main else distributed.FollowerRun("meta-train", ctx.rank)
        res = stage.execute(cfg, run, _upstream(world))  # type: ignore[arg-type]
        print(f"rank {ctx.rank}: {res.summary}", flush=True)
        ctx.shutdown()
    except FewscanError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
