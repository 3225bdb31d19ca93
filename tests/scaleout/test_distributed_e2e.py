"""Two CPU processes (gloo on 127.0.0.1): meta-training equals the single-process run, the primitives
compute the single-process quantities, and a failed or stuck rank ends the job with a clear message
within a bounded time instead of hanging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import distributed as D

from . import maml_worker as W
from .helpers import HERE, plain_ranks, torchrun

pytestmark = pytest.mark.e2e

MAML_WORKER = HERE / "maml_worker.py"
PRIMS_WORKER = HERE / "prims_worker.py"


def test_two_rank_meta_training_equals_single_process(tmp_path: Path) -> None:
    # 2 ranks, meta-batch 5 (3 + 2 tasks: uneven on purpose), ranks initialised differently on purpose.
    job = torchrun(MAML_WORKER, ["--specs", "parity", "--out", str(tmp_path)], timeout=180)
    assert job.returncode == 0, job.output[-4000:]
    single = D.DistContext()  # the same code path, one process, the whole meta-batch
    for spec in W.PARITY_SPECS:
        ref, ref_losses = W.train(spec, single)
        got = torch.load(tmp_path / f"{spec.name}.pt")
        init = W.make_learner(spec, init_seed=1000).state_dict()
        ref_state = ref.state_dict()
        assert got["state"].keys() == ref_state.keys()
        moved = max(float((ref_state[k] - init[k]).abs().max()) for k in init)
        assert moved > 1e-3, f"{spec.name}: meta-training did not change the weights"
        for k, v in ref_state.items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"{spec.name}: {k}")
        # the logged meta-batch loss (weighted over ranks) is the single-process one
        np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5)


def test_uneven_split_is_discriminating() -> None:
    """Guard for the test above: with 3 + 2 tasks, the naive mean of the two ranks' gradients differs from
    the meta-batch mean, so a wrong weighting could not pass it."""
    spec = W.PARITY_SPECS[0]
    learner = W.make_learner(spec, init_seed=1000)
    rng = np.random.default_rng(spec.seed)
    tasks = [W.sample_task(rng) for _ in range(spec.meta_batch)]

    def grads(part: list) -> list[torch.Tensor]:
        learner.zero_grad(set_to_none=True)
        loss, _ = learner.meta_loss(*W.stack(part, torch.float32), n_way=W.N_WAY)
        loss.backward()
        return [p.grad.detach().clone() for p in learner.parameters()]

    full, first, second = grads(tasks), grads(tasks[:3]), grads(tasks[3:])
    weighted = [0.6 * a + 0.4 * b for a, b in zip(first, second)]
    naive = [0.5 * a + 0.5 * b for a, b in zip(first, second)]
    for f, w in zip(full, weighted):
        torch.testing.assert_close(w, f, rtol=1e-4, atol=1e-6)
    assert max(float((f - n).abs().max()) for f, n in zip(full, naive)) > 1e-4


def test_primitives_across_two_plain_processes(tmp_path: Path) -> None:
    ranks = plain_ranks(PRIMS_WORKER, ["--out", str(tmp_path), "--mode", "ok"], timeout=60)
    for r, job in enumerate(ranks):
        assert job.returncode == 0, f"rank {r}: {job.output[-3000:]}"
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [x["shard"] for x in res] == [[0, 1, 2], [3, 4]]
    assert [x["is_main"] for x in res] == [True, False]
    for x in res:
        assert x["backend"] == "gloo"
        # mean over the 5 tasks of per-task gradient (t + 1) = 3 (the naive mean of rank means is 3.25)
        assert x["a_grad"] == pytest.approx([3.0] * 3)
        # gradient on rank 1 only (10, on 2 of the 5 tasks) -> 10 * 2/5 on every rank
        assert x["b_grad"] == [[pytest.approx(4.0)] * 2] * 2
        assert x["c_grad_is_none"] is True  # no rank had one: stays None, as in one process
        # meta-batch of 1: rank 1 has no task, its stale grad is ignored
        assert x["d_grad"] == pytest.approx([4.0, -2.0])
        assert x["mean"] == pytest.approx({"loss": 0.6 * 1.0 + 0.4 * 2.0, "acc": 0.5})
        assert x["module_count"] == 7 and x["dict"] == [[0.0, 0.0], 0]  # rank 0's values everywhere
        assert x["object"] == {"resume_step": 42, "from": 0}
        assert x["divergence_caught"] is True
    assert [x["small_batch_shard"] for x in res] == [["only"], []]
    assert res[0]["module_digest"] == res[1]["module_digest"] == res[0]["in_sync"]


def test_rank_exception_ends_the_torchrun_job_with_its_message() -> None:
    job = torchrun(MAML_WORKER, ["--specs", "light", "--fail-rank", "1", "--fail-step", "1"], timeout=90)
    assert job.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 1" in job.output
    # torchrun's summary names the failed rank as the root cause; the surviving rank says why it stopped
    root = job.output.split("Root Cause")[-1]
    assert "rank      : 1" in root
    assert "rank 0/2: the all-reduce of the meta-gradients failed: another rank died" in job.output


def test_stuck_rank_ends_the_job_after_the_collective_timeout() -> None:
    # rank 1 stays alive but never reaches the all-reduce: torchrun cannot see that, the timeout must.
    job = torchrun(
        MAML_WORKER,
        ["--specs", "light", "--fail-rank", "1", "--fail-step", "1", "--fail-mode", "hang"],
        timeout=90,
        FEWSCAN_DIST_TIMEOUT_S="3",
    )
    assert job.returncode != 0, job.output[-3000:]
    assert (
        "rank 0/2: the all-reduce of the meta-gradients failed: another rank did not reach it within 3 s"
        in (job.output)
    )
    assert "FEWSCAN_DIST_TIMEOUT_S" in job.output


def test_dead_rank_without_torchrun_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    # no elastic agent: rank 1 dies (os._exit) and rank 0 must not wait forever in the all-reduce
    ranks = plain_ranks(
        PRIMS_WORKER, ["--out", str(tmp_path), "--mode", "exit"], timeout=60, FEWSCAN_DIST_TIMEOUT_S="20"
    )
    assert ranks[1].returncode == 3
    assert ranks[0].returncode == 2, ranks[0].output[-3000:]
    assert "rank 0/2: the all-reduce of the meta-gradients failed: another rank died" in ranks[0].output
    assert not (tmp_path / "rank0.json").exists()
