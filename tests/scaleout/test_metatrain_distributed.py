"""The meta-train stage itself under torchrun (2 gloo processes) against one process, on the tiny world of
tests/metatrain. Runs once the stage is wired to pipeline.distributed (MetaTrainer takes `dist=`)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.meta.trainer import MetaTrainer

from .helpers import HERE, REPO, job_env, torchrun

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        "dist" not in inspect.signature(MetaTrainer.__init__).parameters,
        reason="meta-train is not wired to pipeline.distributed yet (MetaTrainer has no `dist` argument)",
    ),
]

WORKER = HERE / "stage_worker.py"


def test_meta_train_stage_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    env = job_env()
    subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), "build"], cwd=REPO, env=env, check=True, timeout=120
    )
    one = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), str(tmp_path / "single")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    job = torchrun(WORKER, [str(tmp_path), str(tmp_path / "dist")], timeout=300)
    assert job.returncode == 0, job.output[-4000:]
    assert "rank 1: trained maml, mamlpp" in job.output
    for method in ("maml", "mamlpp"):
        a = torch.load(
            tmp_path / "single" / "uploaded" / "checkpoints" / method / "last.pt", weights_only=True
        )
        b = torch.load(tmp_path / "dist" / "uploaded" / "checkpoints" / method / "last.pt", weights_only=True)
        assert a["step"] == b["step"] == 4
        # the logged meta-batch losses and validation accuracies are the single-process ones
        for ra, rb in zip(a["history"], b["history"], strict=True):
            assert ra.keys() == rb.keys()
            for k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (method, k, ra["step"])
        # Weights: every parameter that receives a gradient signal matches. Parameters whose true
        # meta-gradient is exactly zero (conv biases just before GroupNorm, the shared head row under
        # softmax's shift invariance) get float32 rounding noise as "gradient", which Adam normalises into
        # full-size steps in ANY run; they differ with the summation order, so they are left out here.
        opt_state = a["optimizer"]["state"]
        names = list(a["learner"].keys())  # = the optimizer's parameter order (no buffers, all trainable)
        assert len(names) == len(a["optimizer"]["param_groups"][0]["params"])
        checked = 0
        for i, name in enumerate(names):
            if i in opt_state and float(opt_state[i]["exp_avg_sq"].max()) < 1e-14:
                continue
            torch.testing.assert_close(b["learner"][name], a["learner"][name], rtol=1e-4, atol=1e-6, msg=name)
            checked += 1
        assert checked >= 4
