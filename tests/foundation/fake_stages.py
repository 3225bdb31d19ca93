"""Tiny stand-in stages with the real stage protocol (pipeline/protocols.py, StageModule), to test the chain
machinery in seconds. Their order and links are the real ones: the registry's (pipeline/stage_configs.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pipeline.config import StrictModel
from pipeline.stage_configs import ORDER, spec
from pipeline.tracking import StageResult

CALLS: list[str] = []


class IngestCfg(StrictModel):
    name: str = "fake"
    size: int = 8


class SectionCfg(StrictModel):
    value: int = 1
    fail: bool = False


def _make(stage: str, cfg_cls: type[StrictModel]) -> SimpleNamespace:
    def execute(cfg, run, up):
        CALLS.append(stage)
        if getattr(cfg, "fail", False):
            raise RuntimeError(f"{stage} was told to fail")
        seen = {k: u.read_json("out.json") for k, u in up.items()}
        (run.outdir / "out.json").write_text(
            json.dumps({"stage": stage, "cfg": cfg.model_dump(), "seen": seen})
        )
        run.log_metrics({"value": 1.0})
        return StageResult(summary=f"{stage} ok", metrics={"items": 3})

    return SimpleNamespace(CONFIG=cfg_cls, run_name=lambda cfg: f"{stage} fake", execute=execute)


MODULES = {stage: _make(stage, SectionCfg if spec(stage).section else IngestCfg) for stage in ORDER}


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the pipeline use these stages: their modules, and their config models and (absent) command-line
    hooks, which suite loading reads from pipeline.stage_configs without importing the stage modules."""
    from pipeline import stage_configs, stages

    monkeypatch.setattr(stages, "module", lambda name: MODULES[name])
    monkeypatch.setattr(stage_configs, "config_model", lambda name: MODULES[name].CONFIG)
    monkeypatch.setattr(stage_configs, "options", lambda name: SimpleNamespace())
