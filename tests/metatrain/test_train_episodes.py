"""meta_train.train_episodes (docs/tasks.md, "Training episodes"): n_way for training other than the test
n_way, per-method settings, rotated classes, and episodes within a group carried into meta-training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import SplitFile, read_artifact
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.metatrain import stage
from pipeline.metatrain.config import MetaTrainConfig

from .test_stage import FakeRun, _cfg, _upstream
from .world import build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_world(tmp_path_factory.mktemp("world"))


def _split(world: dict[str, Path]) -> SplitFile:
    return read_artifact(SplitFile, world["episodes"] / "split.json")


def _index(world: dict[str, Path]):
    import pandas as pd

    return pd.read_parquet(world["store"] / "scan_index.parquet")


def test_training_n_way_and_per_method_settings_override_the_suite(world) -> None:
    split = _split(world)  # the suite: n_way 2, k_shot [1, 2], q_query 3
    cfg = _cfg(
        train_episodes={
            "kinds": ["n_way"],
            "q_query": 2,
            "per_method": {"protonet": {"n_way": 3, "q_query": 1, "k_shot": [1]}},
        }
    )
    maml = stage.train_episodes_config(split, cfg, "maml")
    proto = stage.train_episodes_config(split, cfg, "protonet")
    assert (maml.n_way, maml.q_query, maml.k_shots, maml.kinds) == (2, 2, [1, 2], ["n_way"])
    assert (proto.n_way, proto.q_query, proto.k_shots, proto.kinds) == (3, 1, [1], ["n_way"])
    assert stage.train_episodes_config(split, cfg) == maml  # no method: the section-level settings

    samplers = stage.train_samplers(split, _index(world), cfg)
    rng = np.random.default_rng(0)
    for method, want in (("maml", 2), ("protonet", 3)):
        batch = samplers[method].sample_batch(rng, 4)
        assert {len(e.classes) for e in batch} == {want}
    assert samplers["maml"].table is samplers["protonet"].table  # the scan index is parsed once


def test_methods_with_the_same_settings_share_a_sampler_and_rotations_are_per_method(world) -> None:
    split = _split(world)
    cfg = _cfg(
        methods=["maml", "fomaml", "protonet"],
        train_episodes={
            "kinds": ["n_way"],
            "rotations": [0, 180],
            "per_method": {"protonet": {"rotations": [0]}},
        },
    )
    samplers = stage.train_samplers(split, _index(world), cfg)
    assert samplers["maml"] is samplers["fomaml"] and samplers["protonet"] is not samplers["maml"]
    assert samplers["maml"].rotations == (0, 180) and samplers["protonet"].rotations == (0,)
    rng = np.random.default_rng(3)
    names = {c for _ in range(30) for e in samplers["maml"].sample_batch(rng, 2) for c in e.classes}
    assert any(c.endswith("@rot180") for c in names)


def test_grouped_episodes_stay_grouped_in_meta_training(world) -> None:
    split = _split(world).model_copy(
        update={"group_by": "alphabet", "groups": {"train": {}, "val": {}, "test": {}}}
    )
    assert stage.train_episodes_config(split, _cfg()).group_by == "alphabet"


def test_the_section_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"per_method names \['anil'\], which are not in methods"):
        validate(
            {"methods": ["maml"], "train_episodes": {"per_method": {"anil": {"n_way": 5}}}},
            MetaTrainConfig,
            "t",
        )
    with pytest.raises(ConfigError, match="rotations"):
        validate({"train_episodes": {"rotations": [0, 45]}}, MetaTrainConfig, "t")
    with pytest.raises(ConfigError, match="rotations"):
        validate({"train_episodes": {"rotations": [90, 90]}}, MetaTrainConfig, "t")
    with pytest.raises(ConfigError, match="n_way"):
        validate({"train_episodes": {"n_way": 1}}, MetaTrainConfig, "t")


def test_execute_trains_each_method_with_its_own_episodes(world, tmp_path) -> None:
    run = FakeRun(tmp_path)
    cfg = _cfg(
        train_episodes={"kinds": ["n_way"], "rotations": [0, 90], "per_method": {"protonet": {"n_way": 3}}},
        outer={"steps": 2, "lr": 3e-3, "warmup_steps": 0},
    )
    stage.execute(cfg, run, _upstream(world))  # type: ignore[arg-type]
    derived = run.params["derived"]
    assert derived["train_n_way"] == {"maml": 2, "protonet": 3}
    assert derived["train_rotations"] == {"maml": [0, 90], "protonet": [0, 90]}
