"""The episodes stage: outputs per docs/CONTRACTS.md, params/metrics, failure on a leaking audit,
command-line options; and once through real MLflow runs (e2e)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.episodes import stage
from pipeline.episodes.audit import LeakageError
from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.sampler import TrainSampler, load_episodes
from pipeline.errors import ConfigError
from pipeline.protocols import NullRun, RunLike

from .helpers import META, small_cfg, small_index


class FakeRun(NullRun):
    def __init__(self, outdir: Path):
        super().__init__(outdir, run_id="ep0")
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}
        self.artifacts: list[Path] = []
        self.datasets: dict[str, tuple[Any, str, str]] = {}

    def log_params(self, d: dict[str, Any]) -> None:
        self.params.update(d)

    def log_metrics(self, d: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(d)

    def log_dataset(self, df: Any, name: str, digest: str, context: str, source: str | None = None) -> None:
        self.datasets[name] = (df, digest, context)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(local_path))


# mypy checks the fake against what the stages may call (pipeline/protocols.py)
_IS_A_RUN: type[RunLike] = FakeRun


class FakeIngest:
    run_id = "ingest0"

    def __init__(self, root: Path):
        self.root = root

    def artifact(self, rel: str) -> Path:
        return self.root / rel

    def read_json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())


def _ingest_dir(tmp: Path) -> Path:
    store = tmp / "ingest" / "store"
    store.mkdir(parents=True)
    df = small_index(seed=2)
    df.to_parquet(store / "scan_index.parquet", index=False)
    (store / "store.json").write_text(
        json.dumps(dict(META, label_names=sorted(set("|".join(df.labels).split("|")))))
    )
    return tmp / "ingest"


def test_execute_writes_the_contract_outputs(tmp_path: Path) -> None:
    root = _ingest_dir(tmp_path)
    run = FakeRun(tmp_path / "out")
    run.outdir.mkdir()
    cfg = small_cfg()
    result = stage.execute(cfg, run, {"ingest": FakeIngest(root)})  # type: ignore[dict-item]
    out = run.outdir
    split = json.loads((out / "split.json").read_text())
    assert set(split) >= {
        "normal_label",
        "conditions",
        "pools",
        "pool_patients",
        "kinds",
        "k_shots",
        "q_query",
    }
    assert split["conditions"]["Hernia"]["split"] == "test"
    assert set(split["conditions"]["Hernia"]) >= {"split", "images", "patients"}
    val, test = load_episodes(out / "episodes" / "val.jsonl"), load_episodes(out / "episodes" / "test.jsonl")
    assert len(val) == 2 * 2 * cfg.val_episodes and len(test) == 2 * 2 * cfg.test_episodes
    audit = json.loads((out / "leakage_audit.json").read_text())
    assert audit["passed"] is True and all({"name", "passed", "detail"} <= set(c) for c in audit["checks"])
    # counts are comparable across runs in the UI
    assert run.params["condition.Hernia"] == "test"
    assert run.metrics["patients.Hernia"] == split["conditions"]["Hernia"]["patients"]
    assert run.metrics["pool_patients.test"] == split["pool_patients"]["test"]
    assert run.metrics["episodes.test"] == len(test)
    # each pool is an MLflow dataset input: training / validation / testing, salted keys only
    assert {n: v[2] for n, v in run.datasets.items()} == {
        "split-train": "training",
        "split-val": "validation",
        "split-test": "testing",
    }
    test_df = run.datasets["split-test"][0]
    assert list(test_df.columns) == ["scan_key", "patient_key", "labels", "pool"]
    assert set(test_df["scan_key"]) == {k for lst in split["pools"]["test"].values() for k in lst}
    assert "3 rare conditions" in result.summary and "leakage audit passed" in result.summary
    # meta-train can rebuild the on-the-fly sampler from the artifacts alone
    import pandas as pd

    sampler = TrainSampler(split, pd.read_parquet(root / "store" / "scan_index.parquet"), cfg)
    import numpy as np

    ep = sampler.sample(np.random.default_rng(0))
    train_keys = {k for lst in split["pools"]["train"].values() for k in lst}
    assert all(k in train_keys for c in ep.classes for k in ep.support[c] + ep.query[c])


def test_unknown_condition_fails_before_anything_is_written(tmp_path: Path) -> None:
    root = _ingest_dir(tmp_path)
    run = FakeRun(tmp_path / "out")
    run.outdir.mkdir()
    with pytest.raises(ConfigError, match="Did you mean 'Hernia'"):
        stage.execute(small_cfg(split={"rare": ["hernia "]}), run, {"ingest": FakeIngest(root)})  # type: ignore[dict-item]
    assert not any(run.outdir.iterdir())


def test_failed_audit_uploads_the_audit_and_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _ingest_dir(tmp_path)
    run = FakeRun(tmp_path / "out")
    run.outdir.mkdir()
    real = stage.build_episodes

    def leaky(index, meta, cfg):
        built = real(index, meta, cfg)
        built.audit["checks"][1]["passed"] = False
        built.audit["passed"] = False
        return built

    monkeypatch.setattr(stage, "build_episodes", leaky)
    with pytest.raises(LeakageError, match="leakage audit failed"):
        stage.execute(small_cfg(), run, {"ingest": FakeIngest(root)})  # type: ignore[dict-item]
    assert run.artifacts == [run.outdir / "leakage_audit.json"]
    assert run.metrics["leakage_checks_failed"] == 1


def test_command_line_options_become_overrides() -> None:
    p = argparse.ArgumentParser()
    stage.add_arguments(p)
    args = p.parse_args(["--k-shot", "1,5", "--q-query", "3", "--test-episodes", "20", "--kinds", "binary"])
    over = stage.overrides_from_args(args)
    assert over == ["k_shot=[1, 5]", "kinds=[binary]", "q_query=3", "test_episodes=20"]
    from pipeline.config import apply_overrides, validate

    cfg = validate(apply_overrides({}, over), EpisodesConfig, "cli")
    assert cfg.k_shots == [1, 5] and cfg.kinds == ["binary"] and cfg.test_episodes == 20
    assert stage.overrides_from_args(p.parse_args([])) == []
    assert stage.run_name(cfg) == "episodes binary k=1,5 q=3"


@pytest.mark.e2e
def test_stage_through_mlflow(tmp_store: Path) -> None:
    from pipeline import stages, tracking

    root = _ingest_dir(tmp_store / "src")
    with tracking.stage_run(
        "ingest", run_name="fake ingest", config={}, upstream={}, fp="x", suite=None, dataset="demo"
    ) as run:
        import shutil

        shutil.copytree(root / "store", run.outdir / "store")
        ingest_id = run.run_id
    up = tracking.UpstreamRun.from_id(ingest_id, expect_stage="ingest")
    cfg = small_cfg(test_episodes=10, val_episodes=5)
    outcome = stages.execute_stage("episodes", cfg, upstream={"ingest": up}, suite="t", dataset="demo")
    ep_run = tracking.UpstreamRun.from_id(outcome.run_id, expect_stage="episodes")
    assert ep_run.tags["fewscan.upstream.ingest"] == ingest_id
    assert ep_run.read_json("leakage_audit.json")["passed"] is True
    assert len(load_episodes(ep_run.artifact("episodes/test.jsonl"))) == 40
    assert ep_run.params["condition.Hernia"] == "test"
    run_inputs = tracking.client().get_run(outcome.run_id).inputs
    assert run_inputs is not None
    inputs = run_inputs.dataset_inputs
    contexts = {i.dataset.name: {t.value for t in i.tags if t.key == "mlflow.data.context"} for i in inputs}
    assert contexts == {"split-train": {"training"}, "split-val": {"validation"}, "split-test": {"testing"}}
