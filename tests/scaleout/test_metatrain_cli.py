"""`torchrun --nproc_per_node 2 -m pipeline.cli meta-train SUITE` (gloo, CPU) on the tiny world of
tests/metatrain with a local SQLite store: the command a user types (docs/scaling.md, "The workflow"),
against `fewscan meta-train SUITE` in one process with the same global meta-batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import cli, tracking
from tests.metatrain.cli_suite import SUITE, single_process, write_suite  # noqa: F401 - single_process is a fixture

from .helpers import torchrun

pytestmark = pytest.mark.e2e

# meta-batch 3 over 2 ranks: 2 + 1 tasks (uneven on purpose). A meta-learned (shared) head, so that every
# learner tensor is a meta-parameter; first-order MAML keeps the two runs short.
META_TRAIN: dict[str, Any] = {
    "methods": ["maml"],
    "model": {"filters": 8, "blocks": 2, "head": "shared"},
    "inner": {"steps": 1, "lr": 0.1},
    "outer": {"steps": 4, "lr": 3e-3, "warmup_steps": 0},
    "meta_batch": 3,
    "val_every": 2,
    "checkpoint_every": 2,
    "threads": 1,
    "seeds": [0],
    "device": "cpu",
}


def _runs() -> list[Any]:
    return list(
        tracking.client().search_runs(
            [tracking.experiment_id(f"fewscan/{SUITE}")],
            "tags.`fewscan.stage` = 'meta-train'",
            order_by=["attributes.start_time ASC"],
        )
    )


def _artifacts(run_id: str) -> Path:
    return Path(tracking.UpstreamRun.from_id(run_id).artifact(""))


def test_torchrun_meta_train_command_makes_one_run_equal_to_one_process(
    tmp_store: Path,
    single_process: None,  # noqa: F811 - the fixture imported above
    capsys: pytest.CaptureFixture[str],
) -> None:
    suite = write_suite(tmp_store, META_TRAIN)
    job = torchrun("-m pipeline.cli", ["meta-train", suite.name], cwd=tmp_store, timeout=240)
    assert job.returncode == 0, job.output[-4000:]
    assert "Warning" not in job.output, job.output[-4000:]  # no rank prints a foreign warning
    assert cli.main(["meta-train", suite.name]) == 0
    summaries = [line for line in capsys.readouterr().out.splitlines() if "meta-train finished" in line]
    assert len(summaries) == 1

    dist_run, one_run = _runs()  # started in this order; no other meta-train run exists
    assert dist_run.info.status == one_run.info.status == "FINISHED"
    assert dist_run.data.params["derived.world_size"] == "2"
    assert one_run.data.params["derived.world_size"] == "1"
    # the same work: same fingerprint (the process count is not part of it), same logged settings
    assert dist_run.data.tags[tracking.TAG_FINGERPRINT] == one_run.data.tags[tracking.TAG_FINGERPRINT]
    same = {k: v for k, v in one_run.data.params.items() if k not in ("derived.world_size",)}
    assert {k: dist_run.data.params.get(k) for k in same} == same
    # the torchrun job printed one summary (rank 0's) naming its run
    assert job.output.count("meta-train finished") == 1 and dist_run.info.run_id in job.output
    # one line per trained model, from rank 0, which alone validates: no rank prints "val acc nan"
    assert job.output.count("meta-train: maml: ") == 1 and "val acc nan" not in job.output, job.output[-4000:]

    # Only rank 0 talked to MLflow: one run, one registered version per run, every metric step once,
    # and the same artifacts as the single process.
    c = tracking.client()
    versions = c.search_model_versions(f"name = 'fewscan-{SUITE}-meta'")
    assert sorted(v.run_id for v in versions) == sorted([dist_run.info.run_id, one_run.info.run_id])
    for key in ("maml.train_loss", "maml.val_acc"):
        a = c.get_metric_history(one_run.info.run_id, key)
        b = c.get_metric_history(dist_run.info.run_id, key)
        assert [m.step for m in b] == [m.step for m in a] and len({m.step for m in b}) == len(b), key
        # the logged meta-batch losses (weighted over the 2 + 1 tasks) and accuracies are one process's
        for ma, mb in zip(a, b, strict=True):
            assert mb.value == pytest.approx(ma.value, rel=1e-4, abs=1e-6), (key, ma.step)
    one_dir, dist_dir = _artifacts(one_run.info.run_id), _artifacts(dist_run.info.run_id)
    files = sorted(p.relative_to(one_dir).as_posix() for p in one_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(dist_dir).as_posix() for p in dist_dir.rglob("*") if p.is_file()) == files
    assert {"checkpoints/maml/last.pt", "models/maml/state_dict.pth", "curves.json"} <= set(files)

    # Final weights: equal up to float summation order (docs/scaling.md, "What happens"), for every tensor
    # that gets a meta-gradient. Those whose true meta-gradient is exactly zero (conv biases just before
    # GroupNorm, a shift of all head rows under softmax) get float32 rounding noise as "gradient", which
    # Adam normalises into full-size steps in ANY run, different with any summation order: left out.
    a = torch.load(one_dir / "checkpoints" / "maml" / "last.pt", weights_only=True)
    b = torch.load(dist_dir / "checkpoints" / "maml" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    names = list(a["learner"].keys())  # = the optimizer's parameter order (no buffers, all trainable)
    assert len(names) == len(a["optimizer"]["param_groups"][0]["params"])
    state = a["optimizer"]["state"]
    checked = [
        n for i, n in enumerate(names) if not (i in state and float(state[i]["exp_avg_sq"].max()) < 1e-14)
    ]
    assert len(checked) >= 4, checked
    for name in checked:
        torch.testing.assert_close(b["learner"][name], a["learner"][name], rtol=1e-4, atol=1e-6, msg=name)
