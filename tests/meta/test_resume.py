"""Kill-and-resume: a meta-training process SIGKILLed between two checkpoints and resumed from its last
checkpoint ends with bit-identical weights (incl. learned inner rates) and metrics to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.metatrain.world import build_world

REPO = Path(__file__).resolve().parents[2]


def _worker(world: Path, run_dir: Path, kill_at: int | None = None) -> subprocess.CompletedProcess[str]:
    run_dir.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "tests.meta.resume_worker",
        str(world),
        str(run_dir / "ck"),
        str(run_dir / "metrics.jsonl"),
        str(run_dir / "out.pt"),
    ]
    if kill_at is not None:
        cmd += ["--kill-at", str(kill_at)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.e2e
def test_sigkilled_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    world = tmp_path / "world"
    build_world(world)

    ref = _worker(world, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    # killed after step 6 was logged: the last checkpoint is step 4 (checkpoint_every=4), so steps 5-6
    # are redone after the resume and must come out the same
    killed = _worker(world, tmp_path / "run", kill_at=6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "run" / "out.pt").exists()
    assert torch.load(tmp_path / "run" / "ck" / "last.pt", weights_only=True)["step"] == 4
    resumed = _worker(world, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = torch.load(tmp_path / "ref" / "out.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "out.pt", weights_only=True)
    assert a["learner"].keys() == b["learner"].keys()
    assert any(k.startswith("lr_params.") for k in a["learner"])  # learned inner rates are covered too
    for k in a["learner"]:
        assert torch.equal(a["learner"][k], b["learner"][k]), k
    assert a["history"] == b["history"]  # the in-checkpoint curves, incl. validation rows

    ref_rows = _rows(tmp_path / "ref" / "metrics.jsonl")
    run_rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in run_rows] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]
    by_step = {r["step"]: r for r in run_rows}  # a redone step overwrites its first attempt...
    assert [by_step[s] for s in sorted(by_step)] == ref_rows
    assert run_rows[4:6] == run_rows[6:8]  # ...with identical values
    assert any("val_acc" in r for r in ref_rows)
