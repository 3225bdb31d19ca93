"""EpisodesConfig: structure and values validated up front, with messages that name the key."""

from __future__ import annotations

import pytest

from pipeline.config import apply_overrides, validate
from pipeline.episodes.config import EpisodesConfig
from pipeline.errors import ConfigError


def test_defaults_are_a_usable_suite_shape() -> None:
    cfg = EpisodesConfig()
    assert cfg.kinds == ["binary", "n_way"]
    assert cfg.test_episodes == 600
    assert cfg.k_shots == [1, 5]
    assert cfg.max_patients_per_class == 5 + cfg.q_query
    assert cfg.multilabel == "exclusive_in_episode"
    assert cfg.on_insufficient == "fail"


def test_k_shot_int_or_list_normalised() -> None:
    assert EpisodesConfig(k_shot=5).k_shots == [5]
    assert EpisodesConfig(k_shot=[10, 1, 5, 5]).k_shots == [1, 5, 10]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"k_shott": 5}, "Did you mean 'k_shot'"),
        ({"split": {"rarre": ["Hernia"]}}, "Did you mean 'rare'"),
        ({"k_shot": 0}, "k_shot values must be >= 1"),
        ({"k_shot": []}, "non-empty list"),
        ({"kinds": ["binary", "three_way"]}, "kinds.1"),
        ({"kinds": []}, "kinds"),
        ({"n_way": 1}, "n_way"),
        ({"q_query": 0}, "q_query"),
        ({"multilabel": "any"}, "exclusive_in_episode"),
        ({"on_insufficient": "skip"}, "'fail' or 'drop'"),
        ({"normal_fraction": {"train": 0.8, "val": 0.1, "test": 0.2}}, "must sum to 1"),
        ({"split": {"rare": ["Hernia"], "common": ["Hernia"]}}, "listed in both split.common and split.rare"),
        ({"split": {"rare_below_patients": 50, "validation_below_patients": 40}}, "must be larger"),
    ],
)
def test_bad_values_name_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(data, EpisodesConfig, "tasks/x.yaml:episodes")
    assert needle in str(err.value)


def test_cli_style_override_of_k_shot() -> None:
    data = apply_overrides({"k_shot": 1}, ["k_shot=[1,5]", "q_query=3"])
    cfg = validate(data, EpisodesConfig, "test")
    assert cfg.k_shots == [1, 5] and cfg.q_query == 3
