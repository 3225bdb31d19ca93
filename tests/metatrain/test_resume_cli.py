"""A `fewscan meta-train SUITE` process SIGKILLed after its first checkpoint reached the store, then
`fewscan meta-train SUITE --resume`: the same run continues from that checkpoint, ends FINISHED, and holds
bit for bit what an uninterrupted run holds (docs/scaling.md, "Resuming a run"). All through the command
line and a local SQLite store; the engine-level version of this promise is tests/meta/test_resume.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import cli, tracking

from .cli_suite import SUITE, single_process, write_suite  # noqa: F401 - single_process is a fixture

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
META_TRAIN: dict[str, Any] = {
    "methods": ["maml"],
    "model": {"filters": 8, "blocks": 2},
    "inner": {"steps": 1, "lr": 0.1},
    # 16 steps, a checkpoint every 2: the process is stopped at its first checkpoint, long before the end
    "outer": {"steps": STEPS, "lr": 3e-3, "warmup_steps": 0},
    "meta_batch": 2,
    "val_every": 2,
    "checkpoint_every": 2,
    "threads": 1,
    "seeds": [0],
    "device": "cpu",
}


def _fewscan(cwd: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_at_first_checkpoint(proc: subprocess.Popen[str], store: Path, timeout: float = 240) -> int:
    """SIGKILL `proc` once a last.pt is in the store; returns the step of that checkpoint. The process is
    frozen (SIGSTOP) while the file is read, so the checkpoint read is the one it is killed after; a file
    caught half-copied is read again after letting the process run a moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ended before its first checkpoint: {proc.communicate()[1][-3000:]}"
        found = list(store.glob("mlflow/artifacts/*/artifacts/checkpoints/maml/last.pt"))
        if found:
            proc.send_signal(signal.SIGSTOP)
            try:
                step = int(torch.load(found[0], weights_only=True)["step"])
            except (RuntimeError, EOFError, OSError):
                proc.send_signal(signal.SIGCONT)
                time.sleep(0.01)
                continue
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return step
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no checkpoint within {timeout} s: {proc.communicate()[1][-3000:]}")


def test_sigkilled_meta_train_resumed_through_the_command_equals_an_uninterrupted_run(
    tmp_store: Path,
    single_process: None,  # noqa: F811 - the fixture imported above
) -> None:
    suite = write_suite(tmp_store, META_TRAIN)
    exp = tracking.experiment_id(f"fewscan/{SUITE}")
    c = tracking.client()

    killed = _fewscan(tmp_store, "meta-train", suite.name)
    step = _kill_at_first_checkpoint(killed, tmp_store)
    assert killed.returncode == -signal.SIGKILL
    assert 2 <= step < STEPS and step % 2 == 0
    (run,) = c.search_runs([exp], "tags.`fewscan.stage` = 'meta-train'")
    rid = run.info.run_id
    assert run.info.status == "RUNNING"  # nobody marked it: the process died without a word

    resumed = _fewscan(tmp_store, "meta-train", suite.name, "--resume")
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming {rid}" in err and f"resumed from step {step}/{STEPS}" in err
    assert f"run {rid}" in out  # the summary names the run it continued
    (done,) = c.search_runs([exp], "tags.`fewscan.stage` = 'meta-train'")
    assert done.info.run_id == rid and done.info.status == "FINISHED"
    assert done.data.params["outer.steps"] == str(STEPS)
    steps = {m.step for m in c.get_metric_history(rid, "maml.train_loss")}
    assert steps == set(range(1, STEPS + 1))  # steps after the checkpoint may appear twice, none missing

    # the uninterrupted run, through the same command (in this process)
    assert cli.main(["meta-train", suite.name]) == 0
    ref = next(r for r in c.search_runs([exp], "tags.`fewscan.stage` = 'meta-train'") if r.info.run_id != rid)
    assert ref.info.status == "FINISHED"
    a = Path(tracking.UpstreamRun.from_id(ref.info.run_id).artifact(""))
    b = Path(tracking.UpstreamRun.from_id(rid).artifact(""))
    # Bit for bit: the checkpoint restores weights, optimizer, schedule, validation state and the episode
    # generator, and the uninterrupted run takes the same arithmetic on the same thread count.
    for rel in ("models/maml/state_dict.pth", "checkpoints/maml/best.pt"):
        want, got = torch.load(a / rel, weights_only=True), torch.load(b / rel, weights_only=True)
        want = want.get("learner", want)
        got = got.get("learner", got)
        assert want.keys() == got.keys(), rel
        for k in want:
            assert torch.equal(got[k], want[k]), (rel, k)
    last_a = torch.load(a / "checkpoints/maml/last.pt", weights_only=True)
    last_b = torch.load(b / "checkpoints/maml/last.pt", weights_only=True)
    assert last_a["step"] == last_b["step"] == STEPS
    for k in last_a["learner"]:
        assert torch.equal(last_b["learner"][k], last_a["learner"][k]), k
    # the learning curve (restored from the checkpoint, then continued) and the kept model's record
    assert json.loads((b / "curves.json").read_text()) == json.loads((a / "curves.json").read_text())
    meta_a = json.loads((a / "models/maml/meta_model.json").read_text())
    meta_b = json.loads((b / "models/maml/meta_model.json").read_text())
    assert meta_b["selected"] == meta_a["selected"] and meta_b["best_val_acc"] == meta_a["best_val_acc"]
    assert meta_b["meta_train_run_id"] == rid
