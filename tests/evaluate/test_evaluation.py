"""The whole evaluation on a tiny synthetic world: every method reported, selection on validation only,
deterministic, report and plots written from results.json."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.artifacts import MethodInfo, ResultsFile, read_artifact
from pipeline.errors import DataError
from pipeline.evaluate import evaluation, report, runner
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.stage import write_outputs
from tests.evaluate.world import World, build_world

CFG = {
    "seeds": [0, 1],
    "val_episodes": 4,
    "curve_steps": 3,
    "curve_episodes": 2,
    "meta": {"steps": [1, 3]},
    "finetune": {"steps": [2, 4], "lrs": [0.01, 0.05], "pretrain": {"max_epochs": 2, "batch_size": 16}},
    # a zero head for scratch: its 0-step curve point is then exactly uniform (checked below); the default
    # proto start is covered in test_baselines.py
    "scratch": {"steps": [2, 4], "lrs": [0.05], "head_init": "zero"},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"), n_test=6, n_val=4)


def _inputs(w: World) -> evaluation.Inputs:
    return evaluation.Inputs(
        meta_models=w.meta_models,
        val=w.val,
        test=w.test,
        split=w.split,
        store=w.store,
        load=w.load,
        provenance={"meta_train_run": "mt", "episodes_run": "ep", "ingest_run": "in"},
    )


@pytest.fixture(scope="module")
def spied(world: World) -> tuple[dict[str, Any], list[list[Any]]]:
    """One evaluation, recording every episode list handed to the selection code."""
    seen: list[list[Any]] = []
    real = runner.select_on_validation

    def spy(cands, step_grid, val_episodes, *a, **kw):
        seen.append(list(val_episodes))
        return real(cands, step_grid, val_episodes, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "select_on_validation", spy)
    try:
        res = evaluation.run(_inputs(world), EvaluateConfig.model_validate(CFG))
    finally:
        mp.undo()
    return res, seen


def test_every_method_is_evaluated_and_reported(spied: tuple[dict[str, Any], list], tmp_path: Path) -> None:
    res, _ = spied
    assert set(res["methods"]) == {"maml", "protonet", "finetune", "scratch"}
    assert res["methods"]["maml"]["family"] == "meta-learned"
    assert res["methods"]["finetune"]["family"] == "traditional"
    for gk in ("binary.k2", "n_way.k2"):
        comp = res["comparisons"][gk]
        assert set(comp["ranking"]) == set(res["methods"]) and comp["n_episodes"] == 6
        for m in res["methods"]:
            s = res["results"][m][gk]["per_seed"]["0"]
            assert s["n_episodes"] == 6 and s["n_queries"] == 6 * 2 * 3
            acc = s["acc"]
            # the interval is the mean's over the 6 episodes: 1.96 std / sqrt(6)
            assert acc["n"] == 6 and 0.0 <= acc["mean"] <= 1.0
            assert acc["ci95"] == pytest.approx(1.96 * acc["std"] / math.sqrt(6))
            # calibration pooled over the 36 queries, AUC averaged over the episodes that define one
            assert 0.0 <= s["ece"] <= 1.0 and sum(s["reliability"]["count"]) == 6 * 2 * 3
            assert 0.0 <= s["auc"]["mean"] <= 1.0 and 1 <= s["auc"]["n"] <= 6
            if gk.startswith("binary"):
                for rate in ("sens", "spec"):
                    assert 0.0 <= s[rate]["mean"] <= 1.0 and 1 <= s[rate]["n"] <= 6, rate
                assert set(s["per_condition"]) == {"Delta", "Epsilon"}
    # baselines run per seed, meta-learned methods once (no randomness at test time)
    assert set(res["results"]["finetune"]["binary.k2"]["per_seed"]) == {"0", "1"}
    assert set(res["results"]["maml"]["binary.k2"]["per_seed"]) == {"0"}
    assert res["results"]["scratch"]["binary.k2"]["across_seeds"]["n_seeds"] == 2
    text = report.render(copy.deepcopy(res))
    for m in res["methods"]:
        assert f"| {m} |" in text
    assert "## Verdict" in text and "interval" in text
    assert "Best meta-learned" in text
    # episodes reuse scans of a small pool: the report says how many distinct ones fill the query slots
    q = res["setup"]["queries"]["binary.k2"]
    assert q["query_slots"] == 6 * 2 * 3 and q["distinct_query_patients"] <= q["distinct_query_scans"] <= 36
    assert "distinct scans" in text
    # the patient-level (cluster) bootstrap: per method and group, next to the episode interval
    for gk in ("binary.k2", "n_way.k2"):
        comp = res["comparisons"][gk]
        boot = comp["patient_bootstrap"]
        q = res["setup"]["queries"][gk]
        assert boot["unit"] == "patient" and boot["n_resamples"] == 2000 and boot["interval"] == "percentile"
        assert (
            boot["n_patients"] == q["distinct_query_patients"] and boot["n_query_slots"] == q["query_slots"]
        )
        for m in res["methods"]:
            pat = comp["acc_patient"][m]
            assert pat["mean"] == pytest.approx(comp["acc"][m]["mean"])  # equal query counts per episode
            assert pat["low"] <= pat["mean"] <= pat["high"]
            assert f"[{pat['low'] * 100:.1f}, {pat['high'] * 100:.1f}]" in text
        for v in comp["vs_winner"].values():
            d = v["paired_diff_patient"]
            assert d["low"] <= d["mean"] <= d["high"] and d["excludes_zero"] == (
                d["low"] > 0 or d["high"] < 0
            )
        # per condition: the same bootstrap on that condition's slots; binary point = episode mean
        pcp = comp["per_condition_patient"]
        for m in res["methods"]:
            per_cond = res["results"][m][gk]["per_seed"]["0"]["per_condition"]
            assert set(pcp["acc"][m]) == set(per_cond)
            for c, ci in pcp["acc"][m].items():
                assert ci["low"] <= ci["mean"] <= ci["high"]
                assert 1 <= pcp["n_patients"][c] <= q["distinct_query_patients"]
                if gk.startswith("binary") and len(res["results"][m][gk]["per_seed"]) == 1:
                    assert ci["mean"] == pytest.approx(per_cond[c]["mean"])
                assert f"[{ci['low'] * 100:.1f}, {ci['high'] * 100:.1f}]" in text
    assert "patient CI" in text and "episode CI" in text and "cluster bootstrap over patients" in text


def test_results_hold_no_patient_key(world: World, spied: tuple[dict[str, Any], list]) -> None:
    # patient keys (already salted hashes) only cluster the bootstrap in memory; none is written out
    text = json.dumps(spied[0], default=float) + report.render(copy.deepcopy(spied[0]))
    patients = set(world.store.index["patient_key"].astype(str))
    assert patients and not any(p in text for p in patients)


def test_hyper_parameters_come_from_validation_episodes_only(
    world: World, spied: tuple[dict[str, Any], list]
) -> None:
    res, seen = spied
    val_ids = {(e.kind, e.id) for e in world.val}
    test_keys = world.split.pool_keys("test")
    assert seen, "the selection code was never called"
    for eps in seen:
        assert {(e.kind, e.id) for e in eps} <= val_ids
        keys = {k for e in eps for part in (e.support, e.query) for ks in part.values() for k in ks}
        assert not keys & test_keys
    # the record says what was chosen, on what, from which grid
    sel = res["selection"]["finetune"]["0"]["binary.k2"]
    assert sel["selected_on"] == "validation" and sel["n_val_episodes"] == 4
    assert len(sel["grid"]) == 2 * 2 * 2  # modes x lrs x steps
    best = max(sel["grid"], key=lambda r: r["val_acc"])
    assert sel["chosen"]["val_acc"] == best["val_acc"]
    assert {sel["chosen"]["mode"], sel["chosen"]["steps"]} <= {"head", "whole", 2, 4}
    meta = res["selection"]["maml"]["0"]["n_way.k2"]
    assert [r["steps"] for r in meta["grid"]] == [1, 3]
    proto = res["selection"]["protonet"]["0"]["binary.k2"]
    assert proto["n_val_episodes"] == 0 and proto["chosen"] == {"steps": None}  # nothing to choose


def test_test_episodes_handed_as_validation_are_refused(world: World) -> None:
    inputs = _inputs(world)
    inputs.val = world.test  # a swapped file: test scans where validation scans must be
    with pytest.raises(DataError, match="not in the val pool"):
        evaluation.run(inputs, EvaluateConfig.model_validate(CFG))


def test_curves_cover_steps_and_shots(spied: tuple[dict[str, Any], list]) -> None:
    res, _ = spied
    cur = res["curves"]["maml"]["binary.k2"]
    assert list(cur["steps"]) == ["0", "1", "2", "3"] and list(cur["shots"]) == ["1", "2"]
    assert cur["n_episodes"] == 2
    assert res["curves"]["protonet"]["binary.k2"]["steps"] is None  # no inner loop
    # at 0 steps a zero-head baseline predicts uniformly: argmax picks class 0 = half the queries
    assert res["curves"]["scratch"]["binary.k2"]["steps"]["0"]["mean"] == pytest.approx(0.5)


def test_key_metrics_names(spied: tuple[dict[str, Any], list]) -> None:
    res, _ = spied
    m = evaluation.key_metrics(res)
    for meth in res["methods"]:
        assert f"test.{meth}.binary.k2.acc" in m and f"test.{meth}.binary.k2.acc_ci95" in m
        assert f"test.{meth}.binary.k2.sens" in m and f"test.{meth}.n_way.k2.ece" in m
        assert m[f"test.{meth}.binary.k2.acc_patient_low"] <= m[f"test.{meth}.binary.k2.acc"]
        assert m[f"test.{meth}.binary.k2.acc"] <= m[f"test.{meth}.binary.k2.acc_patient_high"]
    assert "test.finetune.binary.k2.acc_seed_std" in m
    assert m["test.binary.k2.n_episodes"] == 6.0


def test_evaluation_is_deterministic(world: World, spied: tuple[dict[str, Any], list]) -> None:
    res, _ = spied
    cfg = copy.deepcopy(CFG)
    again = evaluation.run(_inputs(world), EvaluateConfig.model_validate(cfg))
    a, b = dict(res), dict(again)
    a.pop("timing_s")
    b.pop("timing_s")
    assert json.dumps(a, sort_keys=True, default=float) == json.dumps(b, sort_keys=True, default=float)


def test_outputs_written(spied: tuple[dict[str, Any], list], tmp_path: Path) -> None:
    res = copy.deepcopy(spied[0])
    write_outputs(res, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["comparisons"].keys() == res["comparisons"].keys()
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "adaptation_vs_steps.png" in pngs and "per_condition.png" in pngs
    assert "reliability_binary_k2.png" in pngs and "confusion_n_way_k2.png" in pngs
    assert all((tmp_path / "plots" / p).stat().st_size > 5000 for p in pngs)
    md = (tmp_path / "report.md").read_text()
    assert "plots/adaptation_vs_steps.png" in md
    # results.json read back through its model renders the same report: the file holds every number of it
    back = read_artifact(ResultsFile, tmp_path / "results.json")
    assert back.plots == saved["plots"] and back.setup.seeds == res["setup"]["seeds"]
    assert report.render(back) == md


METHODS = {
    m: MethodInfo(family=f, description=m, seed_independent=False)
    for m, f in (("maml", "meta-learned"), ("finetune", "traditional"), ("scratch", "from scratch"))
}


def _complete(results: dict[str, Any]) -> dict[str, Any]:
    """A results dict with the fields of results.json's model that the figure under test does not read."""
    out = {"selection": {}, **results}
    out["setup"] = {"seeds": [0], "n_test_episodes": {}, **results.get("setup", {})}
    out["methods"] = {
        m: {"description": m, "seed_independent": False, **i} for m, i in results["methods"].items()
    }
    return out


def ci(mean: float, half: float) -> dict[str, Any]:
    """An episode-level summary as summary.py writes it."""
    return {"mean": mean, "ci95": half, "std": 0.1, "n": 600}


def test_verdict_sentences_on_hand_made_comparisons() -> None:
    methods = METHODS

    comp = {
        "n_episodes": 600,
        "winner": "finetune",
        "ranking": ["finetune", "maml", "scratch"],
        "acc": {"finetune": ci(0.70, 0.02), "maml": ci(0.69, 0.02), "scratch": ci(0.55, 0.02)},
        "vs_winner": {
            "maml": {"overlap": True, "paired_diff": ci(0.01, 0.005), "paired_significant": True},
            "scratch": {"overlap": False, "paired_diff": ci(0.15, 0.01), "paired_significant": True},
        },
    }
    text = " ".join(report.verdict("binary.k5", comp, methods))
    assert "highest mean accuracy is **finetune** (traditional), 70.0% [68.0, 72.0]" in text
    assert "overlaps with maml (69.0% [67.0, 71.0])" in text and "cannot be told apart" in text
    assert "separated from scratch" in text
    assert "paired difference" in text and "finetune is higher; the intervals overlap" in text
    comp["acc"]["maml"] = ci(0.70, 0.02)
    text = " ".join(report.verdict("binary.k5", comp, methods))
    assert "(equal to maml)" in text and "their means are equal" in text


def test_verdict_uses_the_patient_interval_for_support() -> None:
    methods = METHODS

    def boot(mean: float, low: float, high: float) -> dict[str, Any]:
        return {"mean": mean, "low": low, "high": high}

    comp = {
        "n_episodes": 600,
        "winner": "maml",
        "ranking": ["maml", "finetune", "scratch"],
        "acc": {"maml": ci(0.60, 0.008), "finetune": ci(0.57, 0.008), "scratch": ci(0.50, 0.008)},
        "acc_patient": {
            "maml": boot(0.60, 0.55, 0.65),
            "finetune": boot(0.57, 0.52, 0.62),
            "scratch": boot(0.50, 0.45, 0.55),
        },
        # episode intervals do not overlap for finetune, yet the patient-level difference includes 0
        "vs_winner": {
            "finetune": {
                "overlap": False,
                "paired_diff": ci(0.03, 0.01),
                "paired_significant": True,
                "paired_diff_patient": {**boot(0.03, -0.01, 0.07), "excludes_zero": False},
            },
            "scratch": {
                "overlap": False,
                "paired_diff": ci(0.10, 0.01),
                "paired_significant": True,
                "paired_diff_patient": {**boot(0.10, 0.05, 0.15), "excludes_zero": True},
            },
        },
        "patient_bootstrap": {"unit": "patient", "n_patients": 202, "n_resamples": 2000, "seed": [0, 1]},
    }
    text = " ".join(report.verdict("binary.k5", comp, methods))
    assert "(600 test episodes, 202 query patients)" in text
    assert "**maml** (meta-learned), 60.0% [59.2, 60.8] episode CI, [55.0, 65.0] patient CI" in text
    assert "supported over scratch (+10.0 points [5.0, 15.0])" in text
    assert "Its lead over finetune (+3.0 points [-1.0, 7.0]) is not supported" in text
    assert "would have separated finetune" in text
    assert "patient-level paired difference maml − finetune +3.0 points [-1.0, 7.0]: not supported" in text
    assert "It is separated from" not in text  # the episode-level wording no longer decides


def test_per_condition_plot_uses_patient_intervals_when_present(monkeypatch, tmp_path: Path) -> None:
    """The bars' error bars are the patient-level intervals (asymmetric, around the pooled mean) when the
    results carry them, and the episode CI of the seed otherwise."""
    import matplotlib.axes

    from pipeline.evaluate import plots

    calls: list[dict[str, Any]] = []
    real_bar = matplotlib.axes.Axes.bar

    def spy(self, x, height, width, **kw):  # type: ignore[no-untyped-def]
        calls.append({"height": list(height), "yerr": np.asarray(kw["yerr"], dtype=float)})
        return real_bar(self, x, height, width, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    per_cond = {"A": {"mean": 0.6, "ci95": 0.05}, "B": {"mean": 0.5, "ci95": 0.04}}
    results: dict[str, Any] = {
        "methods": {"m": {"family": "meta-learned"}},
        "results": {"m": {"binary.k5": {"per_seed": {"0": {"per_condition": per_cond}}}}},
        "comparisons": {"binary.k5": {"ranking": ["m"]}},
    }
    assert plots.plot_per_condition(_complete(results), tmp_path / "a.png", "0")
    assert calls[-1]["height"] == pytest.approx([60.0, 50.0])
    assert calls[-1]["yerr"] == pytest.approx([5.0, 4.0])
    results["comparisons"]["binary.k5"]["per_condition_patient"] = {
        "acc": {
            "m": {"A": {"mean": 0.62, "low": 0.55, "high": 0.7}, "B": {"mean": 0.5, "low": 0.41, "high": 0.6}}
        },
        "n_patients": {"A": 30, "B": 25},
    }
    assert plots.plot_per_condition(_complete(results), tmp_path / "b.png", "0")
    assert calls[-1]["height"] == pytest.approx([62.0, 50.0])
    assert calls[-1]["yerr"] == pytest.approx(np.array([[7.0, 9.0], [8.0, 10.0]]))


def test_meta_learned_methods_are_evaluated_once_per_meta_training_seed(world: World, tmp_path: Path) -> None:
    """A meta-train run with several seeds: each seed's model runs on the same test episodes, the seeds
    enter the bootstrap, and the report shows each seed and says the intervals include them."""
    import torch

    from pipeline.meta.model_io import load_meta_model, save_meta_model
    from tests.evaluate.world import SIZE, SPEC

    extra = {}
    for s in (3, 4):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + s)
            from pipeline.meta.models import build_model

            model = build_model(SPEC, 1, (SIZE, SIZE))
        folder = tmp_path / "seeds" / "protonet" / str(s)
        save_meta_model(folder, model, method="protonet", model_spec=SPEC, image_shape=(1, SIZE, SIZE),
                        inner={"steps": 3, "lr": 0.1, "trainable": "all"}, extra={"meta_train_seed": s})  # fmt: skip
        extra[s] = load_meta_model(folder)
    inputs = _inputs(world)
    inputs.meta_seed_models = {"protonet": extra}
    cfg = EvaluateConfig.model_validate(
        {**CFG, "seeds": [0], "curve_episodes": 0, "finetune": {"enabled": False}}
    )
    res = evaluation.run(inputs, cfg)
    assert res["setup"]["meta_train_seeds"] == {"maml": [0], "protonet": [0, 3, 4]}
    gk = "binary.k2"
    per_seed = res["results"]["protonet"][gk]["per_seed"]
    assert set(per_seed) == {"0", "3", "4"}
    # different weights, different predictions on the same episodes
    assert (
        len({round(v["acc"]["mean"], 9) for v in per_seed.values()}) > 1
        or len({json.dumps(v["per_condition"], sort_keys=True) for v in per_seed.values()}) > 1
    )
    comp = res["comparisons"][gk]
    assert comp["n_seeds"]["protonet"] == 3 and comp["n_seeds"]["maml"] == 1
    mean_over_seeds = np.mean([v["acc"]["mean"] for v in per_seed.values()])
    assert comp["acc"]["protonet"]["mean"] == pytest.approx(mean_over_seeds)
    assert comp["acc_patient"]["protonet"]["mean"] == pytest.approx(mean_over_seeds)
    assert res["methods"]["protonet"]["seed_independent"] is False
    text = report.render(copy.deepcopy(res))
    assert "meta-trained once per seed (maml: 0; protonet: 0, 3, 4)" in text
    assert "Against training from scratch" in text


def test_an_evaluation_seed_that_no_meta_training_seed_matches_still_reports(
    world: World, tmp_path: Path
) -> None:
    """Baselines keyed by evaluation seed 1, meta-learned methods by meta-training seed 0: the report, the
    plots and the MLflow metrics read each method's own first seed (a rerun with evaluate.seeds=[1])."""
    cfg = EvaluateConfig.model_validate(
        {**CFG, "seeds": [1], "curve_episodes": 0, "finetune": {"enabled": False}}
    )
    res = evaluation.run(_inputs(world), cfg)
    assert set(res["results"]["scratch"]["binary.k2"]["per_seed"]) == {"1"}
    assert set(res["results"]["maml"]["binary.k2"]["per_seed"]) == {"0"}
    write_outputs(res, tmp_path)
    assert (tmp_path / "report.md").read_text().count("| maml |") >= 1
    assert "test.maml.binary.k2.acc" in evaluation.key_metrics(res)


def test_a_method_that_trained_to_chance_marks_the_verdict(world: World) -> None:
    """The world's meta-models are untrained; one that records a validation accuracy at chance, and a
    traditional classifier at chance, both put a WARNING at the top of the verdict."""
    inputs = _inputs(world)
    inputs.meta_models = dict(inputs.meta_models)
    mm = copy.copy(inputs.meta_models["maml"])
    # the world's val episodes mix 2- and 3-way: chance ~0.42
    mm.meta = mm.meta.model_copy(update={"best_val_acc": 0.41})
    inputs.meta_models["maml"] = mm
    warnings = evaluation.training_warnings(inputs, {"0": {"near_chance": True, "holdout_macro_auc": 0.52}})
    assert len(warnings) == 2 and "maml" in warnings[0] and "macro AUC 0.520" in warnings[1]
    cfg = EvaluateConfig.model_validate(
        {**CFG, "seeds": [0], "curve_episodes": 0, "finetune": {"enabled": False}}
    )
    res = evaluation.run(inputs, cfg)
    assert any("maml" in w for w in res["warnings"])
    text = report.render(copy.deepcopy(res))
    verdict = text.split("## Verdict", 1)[1].split("##", 1)[0]
    assert "WARNING" in verdict and "maml" in verdict


def test_plots_draw_chance_and_ring_the_steps_chosen_on_validation(monkeypatch, tmp_path: Path) -> None:
    """Issue 17 item 8: per-condition bars get a chance line (1/n_way: accuracy for binary episodes, recall
    for n-way ones), and the steps curve rings the point the report uses (chosen on validation), which
    need not be the test curve's peak."""
    import matplotlib.axes

    from pipeline.evaluate import plots

    hlines: list[float] = []
    rings: list[tuple[list[float], list[float]]] = []
    real_axhline, real_plot = matplotlib.axes.Axes.axhline, matplotlib.axes.Axes.plot

    def spy_hline(self, y=0, *a, **kw):  # type: ignore[no-untyped-def]
        hlines.append(float(y))
        return real_axhline(self, y, *a, **kw)

    def spy_plot(self, *args, **kw):  # type: ignore[no-untyped-def]
        if kw.get("mfc") == "none":
            rings.append((list(args[0]), list(args[1])))
        return real_plot(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", spy_hline)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy_plot)
    per_cond = {"A": {"mean": 0.6, "ci95": 0.05}}
    curve = {
        "0": {"mean": 0.5, "ci95": 0.02},
        "2": {"mean": 0.7, "ci95": 0.02},
        "5": {"mean": 0.65, "ci95": 0.02},
    }
    results: dict[str, Any] = {
        "setup": {"n_way": {"binary.k5": 2, "n_way.k5": 4}, "seeds": [0]},
        "methods": {"maml": {"family": "meta-learned"}},
        "results": {
            "maml": {g: {"per_seed": {"0": {"per_condition": per_cond}}} for g in ("binary.k5", "n_way.k5")}
        },
        "comparisons": {g: {"ranking": ["maml"]} for g in ("binary.k5", "n_way.k5")},
        "curves": {"maml": {"binary.k5": {"steps": curve}}},
        "selection": {"maml": {"0": {"binary.k5": {"chosen": {"steps": 5}}}}},
    }
    assert plots.plot_per_condition(_complete(results), tmp_path / "a.png", "0")
    assert hlines == [50.0, 25.0]
    assert plots.plot_step_curves(_complete(results), tmp_path / "s.png")
    assert rings == [([5], [pytest.approx(65.0)])]  # the chosen 5 steps, not the test peak at 2
