"""`--resume` continues the work a run started and nothing else (issue 18, 2c): through the real stage entry
point (`stages.execute_stage`) on a real SQLite store, a meta-train run interrupted after its first
checkpoint is refused a resume with other settings, naming each changed key and the flags that restore it,
and resumed with its own settings it ends FINISHED with what it claims."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline import stages, tracking
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.meta.model_io import load_meta_model
from pipeline.metatrain.config import MetaTrainConfig
from pipeline.resume import config_changes

from .world import build_world


def _cfg(**over: Any) -> MetaTrainConfig:
    base: dict[str, Any] = {
        "methods": ["fomaml"],
        "model": {"filters": 8, "blocks": 2},
        "inner": {"steps": 1, "lr": 0.1},
        "outer": {"steps": 6, "lr": 3e-3, "warmup_steps": 0},
        "meta_batch": 2,
        "val_every": 2,
        "checkpoint_every": 2,
        "threads": 1,
        "seeds": [0],
        "device": "cpu",
    }
    base.update(over)
    return validate(base, MetaTrainConfig, "test")


def _upstream_runs(world: dict[str, Path]) -> dict[str, tracking.UpstreamRun]:
    """An ingest and an episodes run holding the tiny world, laid out as those stages write them."""
    with tracking.stage_run(
        "ingest", run_name="i", config={}, upstream={}, fp="i" * 24, suite="tiny", dataset="d"
    ) as run:
        shutil.copytree(world["store"], run.outdir / "store")
    ingest = tracking.UpstreamRun.from_id(run.run_id, "ingest")
    with tracking.stage_run(
        "episodes",
        run_name="e",
        config={},
        upstream={"ingest": ingest},
        fp="e" * 24,
        suite="tiny",
        dataset="d",
    ) as run:
        shutil.copytree(world["episodes"], run.outdir, dirs_exist_ok=True)
    return {"episodes": tracking.UpstreamRun.from_id(run.run_id, "episodes")}


def _interrupted_run(upstream: dict[str, tracking.UpstreamRun], monkeypatch: pytest.MonkeyPatch) -> str:
    """A meta-train run stopped (Ctrl-C: KILLED) right after uploading its first last.pt (step 2 of 6)."""
    upload = tracking.StageRun.log_artifact

    def stop_after_first_checkpoint(self: tracking.StageRun, path: Any, artifact_path: Any = None) -> None:
        upload(self, path, artifact_path)
        if Path(path).name == "last.pt":
            raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(tracking.StageRun, "log_artifact", stop_after_first_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            stages.execute_stage("meta-train", _cfg(), upstream=upstream, suite="tiny", dataset="d")
    (run,) = tracking.client().search_runs(
        [tracking.experiment_id("fewscan/tiny")], "tags.`fewscan.stage` = 'meta-train'"
    )
    assert run.info.status == "KILLED"
    return str(run.info.run_id)


def test_resume_refuses_other_settings_and_continues_with_its_own(
    tmp_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = _upstream_runs(build_world(tmp_store / "world"))
    rid = _interrupted_run(upstream, monkeypatch)
    c = tracking.client()
    started = c.get_run(rid).data

    # the case: started with 6 steps, resumed with another count (and another inner lr)
    changed = _cfg(outer={"steps": 4, "lr": 3e-3, "warmup_steps": 0}, inner={"steps": 1, "lr": 0.05})
    with pytest.raises(ConfigError) as err:
        stages.execute_stage(
            "meta-train", changed, upstream=upstream, suite="tiny", dataset="d", resume_run_id=rid
        )
    msg = str(err.value)
    assert f"cannot resume meta-train run {rid}: it started with other settings" in msg
    assert "outer.steps: 6 -> 4" in msg and "inner.lr: 0.1 -> 0.05" in msg
    assert "--set outer.steps=6" in msg and "--set inner.lr=0.1" in msg and "without --resume" in msg
    assert "\n" not in msg
    after = c.get_run(rid)
    assert after.info.status == "KILLED"  # refused before the run was reopened
    assert after.data.params == started.params and after.data.tags == started.tags

    # with the settings it started with, it continues from its checkpoint and claims what it computed
    out = stages.execute_stage(
        "meta-train", _cfg(), upstream=upstream, suite="tiny", dataset="d", resume_run_id=rid
    )
    assert out.run_id == rid
    done = c.get_run(rid)
    assert done.info.status == "FINISHED" and done.data.params["outer.steps"] == "6"
    assert done.data.tags[tracking.TAG_FINGERPRINT] == started.tags[tracking.TAG_FINGERPRINT]
    steps = sorted(m.step for m in c.get_metric_history(rid, "fomaml.train_loss"))
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-2 before the interruption, 3-6 after: none twice
    model = load_meta_model(tracking.UpstreamRun.from_id(rid).artifact("models/fomaml"))
    assert model.meta.outer_steps == 6


def test_config_changes_lists_every_differing_leaf() -> None:
    """`config_changes` lists every leaf that differs, nested keys dotted, keys on one side only included."""
    old = {"outer": {"steps": 60, "lr": 0.001}, "methods": ["maml"], "threads": 2}
    new = {"outer": {"steps": 30, "lr": 0.001}, "methods": ["maml", "protonet"], "device": "cpu"}
    keys = [k for k, _, _ in config_changes(old, new)]
    assert keys == ["outer.steps", "methods", "threads", "device"]
    assert config_changes(old, old) == []
