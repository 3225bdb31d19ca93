"""The short table `fewscan demo` ends with: right numbers, right order, only clear differences named."""

from __future__ import annotations

from typing import Any

from pipeline.artifacts import ResultsFile
from pipeline.evaluate.report import learned_table


def _typed(results: dict[str, Any]) -> ResultsFile:
    """results.json's model around the parts the table reads (the rest empty)."""
    setup = {"seeds": [0], "n_test_episodes": {}, **results.pop("setup")}
    return ResultsFile.model_validate(
        {"methods": {}, "selection": {}, "results": {}, **results, "setup": setup}
    )


def _results() -> ResultsFile:
    def acc(mean: float) -> dict[str, float]:
        return {"mean": mean, "ci95": 0.02, "std": 0.05, "n": 300}

    def pat(mean: float, low: float, high: float) -> dict[str, float]:
        return {"mean": mean, "low": low, "high": high}

    return _typed(
        {
            "setup": {"n_way": {"binary.k5": 2, "n_way.k5": 4}, "test_conditions": ["Edema", "Hernia"]},
            "comparisons": {
                "binary.k5": {
                    "acc": {"scratch": acc(0.517), "protonet": acc(0.803), "maml": acc(0.699)},
                    "acc_patient": {
                        "scratch": pat(0.517, 0.504, 0.531),
                        "protonet": pat(0.803, 0.752, 0.853),
                        "maml": pat(0.699, 0.664, 0.732),
                    },
                    "pairs_patient": {
                        "protonet - maml": {
                            "a": "protonet",
                            "b": "maml",
                            "mean": 0.104,
                            "excludes_zero": True,
                        },
                        "maml - scratch": {"a": "maml", "b": "scratch", "mean": 0.182, "excludes_zero": True},
                        "protonet - scratch": {
                            "a": "protonet",
                            "b": "scratch",
                            "mean": 0.286,
                            "excludes_zero": False,
                        },
                    },
                },
                "n_way.k5": {
                    "acc": {"scratch": acc(0.26), "protonet": acc(0.31), "maml": acc(0.30)},
                    "pairs_patient": {},
                },
            },
            "warnings": ["maml (meta-training seed 1) ended at validation accuracy 0.51"],
        }
    )


def test_rows_follow_the_first_setting_ranking_with_patient_intervals_and_chance() -> None:
    lines = learned_table(_results())
    assert (
        lines[0] == "What was learned: test accuracy (%) on Edema, Hernia with a 95% seed + patient interval"
    )
    assert lines[1].split() == ["method", "binary", "5-shot", "4-way", "5-shot"]
    assert [ln.split()[0] for ln in lines[2:6]] == ["protonet", "maml", "scratch", "chance"]
    assert lines[2].split()[1:4] == ["80.3", "[75.2,", "85.3]"]
    # no patient bootstrap for the 4-way setting: the episode interval (mean ± ci95) instead
    assert lines[2].split()[4:] == ["31.0", "±", "2.0"]
    assert lines[5].split() == ["chance", "50.0", "25.0"]


def test_only_positive_differences_whose_interval_excludes_zero_are_named() -> None:
    lines = learned_table(_results())
    assert "  binary 5-shot: protonet > maml (+10.4); maml > scratch (+18.2)" in lines
    assert "  4-way 5-shot: no difference whose interval excludes 0" in lines
    assert lines[-1] == "  1 training warning(s): see the report's verdict"


def test_no_comparison_gives_no_table() -> None:
    assert learned_table(_typed({"setup": {}, "comparisons": {}})) == []
