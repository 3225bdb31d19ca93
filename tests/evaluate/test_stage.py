"""The evaluate stage wiring, without MLflow: upstream artifacts laid out on disk as the upstream stages
write them, a stand-in run that records what is logged; plus the config and command-line options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.evaluate import stage
from pipeline.evaluate.config import EvaluateConfig
from pipeline.protocols import NullRun, RunLike
from tests.evaluate.world import build_world


class FakeUpstream:
    def __init__(self, stage_name: str, root: Path, run_id: str, ups: dict[str, FakeUpstream] | None = None):
        self.stage, self.root, self.run_id, self._ups = stage_name, root, run_id, ups or {}

    def artifact(self, rel: str) -> Path:
        return self.root / rel

    def read_json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())

    def upstream(self, s: str) -> FakeUpstream:
        return self._ups[s]


class FakeRun(NullRun):
    def __init__(self, outdir: Path):
        super().__init__(outdir, run_id="ev0")
        self.params: dict[str, Any] = {}

    def log_params(self, d: dict[str, Any]) -> None:
        self.params.update(d)


# mypy checks the fake against what the stages may call (pipeline/protocols.py)
_IS_A_RUN: type[RunLike] = FakeRun


def test_execute_reads_upstream_and_writes_outputs(tmp_path: Path) -> None:
    w = build_world(tmp_path / "up", n_test=3, n_val=3)
    ingest = FakeUpstream("ingest", w.root, "ing1")
    episodes = FakeUpstream("episodes", w.root, "ep1", {"ingest": ingest})
    mt = FakeUpstream("meta-train", w.root, "mt1", {"episodes": episodes})
    cfg = EvaluateConfig.model_validate(
        {
            "seeds": [0],
            "val_episodes": 3,
            "curve_episodes": 1,
            "curve_steps": 2,
            "finetune": {"steps": [2], "lrs": [0.01], "modes": ["head"], "pretrain": {"max_epochs": 1}},
            "scratch": {"steps": [2], "lrs": [0.05]},
            "methods": ["maml"],
        }
    )
    run = FakeRun(tmp_path / "out")
    res = stage.execute(cfg, run, {"meta-train": mt})  # type: ignore[dict-item]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"maml", "finetune", "scratch"}  # protonet filtered by `methods`
    assert results["setup"]["meta_train_run"] == "mt1" and results["setup"]["ingest_run"] == "ing1"
    assert (out / "report.md").read_text().startswith("# Evaluation")
    assert (out / "plots" / "per_condition.png").is_file()
    assert (
        res.metrics["test.maml.binary.k2.acc"] == results["comparisons"]["binary.k2"]["acc"]["maml"]["mean"]
    )
    assert "binary.k2" in res.summary and "patient CI" in res.summary
    pat = results["comparisons"]["binary.k2"]["acc_patient"]["maml"]
    assert res.metrics["test.maml.binary.k2.acc_patient_low"] == pat["low"]
    assert run.params["chosen.finetune.binary.k2"] == {"mode": "head", "lr": 0.01, "steps": 2}


def test_unknown_method_is_named(tmp_path: Path) -> None:
    w = build_world(tmp_path / "up", n_test=2, n_val=2)
    with pytest.raises(ConfigError, match="valid: maml, protonet"):
        stage._meta_models(w.root / "models", ["mamll"], "cpu")


def test_options_map_onto_the_config() -> None:
    p = argparse.ArgumentParser()
    stage.add_arguments(p)
    args = p.parse_args(["--seeds", "0,1,2", "--max-episodes", "600", "--methods", "maml,protonet"])
    ov = stage.overrides_from_args(args)
    assert ov == ["seeds=[0, 1, 2]", "max_episodes=600", "methods=[maml,protonet]"]
    from pipeline.config import apply_overrides

    cfg = validate(apply_overrides({}, ov), EvaluateConfig, "test")
    assert cfg.seeds == [0, 1, 2] and cfg.max_episodes == 600 and cfg.methods == ["maml", "protonet"]
    assert "seeds=0,1,2" in stage.run_name(cfg) and "max=600" in stage.run_name(cfg)
    with pytest.raises(ConfigError, match="--seeds"):
        stage.overrides_from_args(p.parse_args(["--seeds", "a,b"]))


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="unknown key 'finetune.stepz'.*Did you mean 'steps'"):
        validate({"finetune": {"stepz": [1]}}, EvaluateConfig, "suite")
    with pytest.raises(ConfigError, match="seeds"):
        validate({"seeds": [0, 0]}, EvaluateConfig, "suite")
    with pytest.raises(ConfigError, match="scratch.lrs"):
        validate({"scratch": {"lrs": [-1.0]}}, EvaluateConfig, "suite")
    with pytest.raises(ConfigError, match="modes"):
        validate({"finetune": {"modes": ["head", "head"]}}, EvaluateConfig, "suite")
