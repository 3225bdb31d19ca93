"""Command-line flags compose with the suite section they override (pipeline/suite.py `override_section` and
the stages' `compose_section` hooks): a flag replaces what it names, and suite values that belong to what it
replaced are left out, said in the log, instead of being silently combined with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import cli
from pipeline.errors import ConfigError
from pipeline.suite import load_suite


def _suite(tmp_path: Path, **sections: Any) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "dataset": "nowhere.yaml", **sections}))
    return path


def _config(stage: str, argv: list[str]) -> Any:
    """The stage config exactly as `fewscan <stage> SUITE <flags>` builds it (cli.py), without running it."""
    args = cli.build_parser(argv).parse_args(argv)
    return load_suite(args.suite).stage_config(stage, cli._stage_overrides(stage, args))


ADAPT = {
    "support": "data/hernia/support",
    "query": "data/hernia/query",
    "condition": "Hernia",
    "register_name": "fewscan-hernia-study",
    "salt_file": "data/salt",
    "steps": 7,
}


def test_adapt_support_flag_leaves_out_the_suites_query_condition_and_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue: `fewscan adapt demo_quick --support DIR --condition Mass` used the suite's Hernia query set."""
    suite = str(_suite(tmp_path, adapt=ADAPT))
    cfg = _config("adapt", ["adapt", suite, "--support", "data/mass", "--condition", "Mass"])
    assert cfg.support == Path("data/mass") and cfg.condition == "Mass"
    assert cfg.query is None and cfg.register_name is None
    assert cfg.salt_file == Path("data/salt") and cfg.steps == 7  # not about the support set: kept
    err = capsys.readouterr().err
    assert (
        "names another support set, so the suite's adapt.query, adapt.register_name (of its own support set) "
        "are not used; give --query DIR and --set register_name=NAME to set them"
    ) in err
    # with --query the two sets are the command line's; without --condition the suite's is not inherited
    cfg = _config("adapt", ["adapt", suite, "--support", "data/mass", "--query", "data/mass-q"])
    assert cfg.query == Path("data/mass-q") and cfg.condition is None and cfg.register_name is None
    # --set support=... is the same override as --support
    assert _config("adapt", ["adapt", suite, "--set", "support=data/mass"]).query is None


def test_adapt_flags_that_do_not_replace_the_support_set_keep_the_suites_set(tmp_path: Path) -> None:
    suite = str(_suite(tmp_path, adapt=ADAPT))
    same = _config("adapt", ["adapt", suite, "--support", str(Path("data/hernia/support").resolve())])
    assert same.query == Path("data/hernia/query") and same.condition == "Hernia"
    q = _config("adapt", ["adapt", suite, "--query", "data/other-q", "--steps", "3"])
    assert q.support == Path("data/hernia/support") and q.query == Path("data/other-q") and q.steps == 3
    assert q.condition == "Hernia" and q.register_name == "fewscan-hernia-study"
    # another condition of the same support set: the suite's registry name (of its condition) is not used
    c = _config("adapt", ["adapt", suite, "--condition", "No Finding"])
    assert c.query == Path("data/hernia/query") and c.register_name is None


def test_run_set_of_the_adapt_support_composes_the_same_way(tmp_path: Path) -> None:
    """`fewscan run SUITE --set adapt.support=DIR` goes through the same hook as `fewscan adapt`."""
    suite = load_suite(_suite(tmp_path, adapt=ADAPT), ["adapt.support=data/mass", "description=x"])
    assert suite.cfg.adapt is not None and suite.cfg.description == "x"
    assert suite.cfg.adapt["support"] == "data/mass" and "query" not in suite.cfg.adapt
    cfg = suite.stage_config("adapt")
    assert cfg.query is None and cfg.condition is None and cfg.salt_file == Path("data/salt")


def test_meta_train_seeds_flag_replaces_the_suites_single_seed(tmp_path: Path) -> None:
    suite = str(_suite(tmp_path, meta_train={"methods": ["maml"], "seed": 4}))
    assert _config("meta-train", ["meta-train", suite]).seeds == [4]
    assert _config("meta-train", ["meta-train", suite, "--seeds", "1,2"]).seeds == [1, 2]
    newer = str(_suite(tmp_path, meta_train={"methods": ["maml"], "seeds": [0, 1, 2]}))
    assert _config("meta-train", ["meta-train", newer, "--set", "seed=5"]).seeds == [5]


def test_meta_train_methods_flag_drops_per_method_settings_of_methods_it_does_not_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mt = {
        "methods": ["maml", "protonet"],
        "train_episodes": {"q_query": 5, "per_method": {"protonet": {"n_way": 5}, "maml": {"q_query": 3}}},
    }
    suite = str(_suite(tmp_path, meta_train=mt))
    cfg = _config("meta-train", ["meta-train", suite, "--methods", "maml"])
    assert cfg.methods == ["maml"] and list(cfg.train_episodes.per_method) == ["maml"]
    assert cfg.train_episodes.q_query == 5
    assert "train_episodes.per_method settings of protonet are not used" in capsys.readouterr().err
    both = _config("meta-train", ["meta-train", suite])
    assert sorted(both.train_episodes.per_method) == ["maml", "protonet"]


def test_episodes_n_way_flag_without_n_way_episodes_is_refused(tmp_path: Path) -> None:
    suite = str(_suite(tmp_path, episodes={"kinds": ["binary"], "n_way": 3}))
    assert _config("episodes", ["episodes", suite]).n_way == 3  # in the suite alone: unused, fine
    with pytest.raises(ConfigError, match=r"--n-way 4 sets the size of n_way episodes, but .* \['binary'\]"):
        _config("episodes", ["episodes", suite, "--n-way", "4"])
    cfg = _config("episodes", ["episodes", suite, "--n-way", "4", "--kinds", "binary,n_way"])
    assert cfg.n_way == 4 and cfg.kinds == ["binary", "n_way"]


def test_evaluate_and_ingest_flags_have_nothing_to_compose(tmp_path: Path) -> None:
    """evaluate's flags (--seeds, --max-episodes, --methods, --val-episodes) and ingest's (--workers,
    --no-cache) each set one key that no other key of their section depends on."""
    suite = str(_suite(tmp_path, evaluate={"seeds": [0], "methods": ["maml", "protonet"]}))
    cfg = _config("evaluate", ["evaluate", suite, "--methods", "maml", "--seeds", "1,2"])
    assert cfg.methods == ["maml"] and cfg.seeds == [1, 2]
