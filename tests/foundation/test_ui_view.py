"""What the MLflow UI shows of fewscan's runs (issue 17 items 4 and 8): experiments typed as model
training with the suite's description, links that open the model-training view, run descriptions that
link their upstream runs back to ingest and hold evaluate's report, and a shared run-table view whose
columns are the key metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from pipeline import tracking, ui_view
from pipeline.chain import run_chain
from pipeline.tracking import StageResult

from . import fake_stages

SUITE = """
name: fakeui
description: A suite whose *description* the UI shows.
dataset: {manifest}
episodes: {{value: 1}}
meta_train: {{value: 1}}
adapt: {{value: 1}}
evaluate: {{value: 1}}
"""

REPORT = "# Evaluation\n\n## Verdict\n\n- protonet leads.\n\n## Results\n\n| method | acc |\n|---|---|\n| maml | 50.0 |\n"


def _evaluate_with_report() -> SimpleNamespace:
    """The fake evaluate stage, writing a report and a plot as the real one does."""

    def execute(cfg, run, up):
        (run.outdir / "plots").mkdir()
        Image.new("RGB", (2000, 1000), "white").save(run.outdir / "plots" / "per_condition.png")
        (run.outdir / "report.md").write_text(REPORT + "\n## Plots\n\n- `plots/per_condition.png`\n")
        run.log_metrics({"test.maml.binary.k1.acc": 0.5, "test.maml.binary.k1.auc": 0.6})
        return StageResult(summary="evaluate ok", metrics={})

    return SimpleNamespace(
        CONFIG=fake_stages.SectionCfg,
        UPSTREAM=("meta-train",),
        run_name=lambda cfg: "evaluate fake",
        execute=execute,
    )


@pytest.fixture
def chain(tmp_store: Path, monkeypatch: pytest.MonkeyPatch):
    fake_stages.install(monkeypatch)
    monkeypatch.setitem(fake_stages.MODULES, "evaluate", _evaluate_with_report())
    (tmp_store / "m.yaml").write_text("name: fakedata\nsize: 8\n")
    suite = tmp_store / "suite.yaml"
    suite.write_text(SUITE.format(manifest=tmp_store / "m.yaml"))
    return run_chain(str(suite))


def test_experiment_is_model_training_with_description_view_and_links(chain) -> None:
    exp = tracking.client().get_experiment(chain.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    note = exp.tags["mlflow.note.content"]
    assert note.startswith("**fakeui**: A suite whose *description* the UI shows.")
    assert ui_view.runs_path(chain.experiment_id) in note
    # the shared run-table view: key metrics as columns, runs flat
    state = json.loads(exp.tags["mlflow.sharedViewState.fewscan"])
    assert state["selectedColumns"] == ["metrics.`test.maml.binary.k1.acc`", "attributes.`Description`"]
    assert state["orderByKey"] == "attributes.end_time"  # not start time: the UI would fold the stage runs
    # the links fewscan prints open the model-training view
    url = tracking.run_url(chain.experiment_id, chain.parent_run_id)
    assert url.endswith(
        f"#/experiments/{chain.experiment_id}/runs/{chain.parent_run_id}?workflowType=machine_learning"
    )
    lines = tracking.ui_lines("http://127.0.0.1:5123")
    assert lines == [
        f"  fewscan/fakeui: http://127.0.0.1:5123/#/experiments/{chain.experiment_id}/runs"
        "?viewStateShareKey=fewscan&workflowType=machine_learning"
    ]


def test_run_descriptions_link_upstream_runs_back_to_ingest_and_hold_the_report(chain) -> None:
    c = tracking.client()
    ev = c.get_run(chain.outcomes["evaluate"].run_id)
    note = ev.data.tags["mlflow.note.content"]
    assert note.splitlines()[0].startswith("evaluate finished in ")  # what the run table's column shows
    links = re.findall(r"\]\(#/experiments/(\w+)/runs/(\w+)\?workflowType=machine_learning\)", note)
    stages_linked = []
    for exp_id, run_id in links:
        run = c.get_run(run_id)  # raises if the link points at no run
        assert run.info.experiment_id == exp_id
        stages_linked.append(run.data.tags["fewscan.stage"])
        assert run.info.run_id == chain.outcomes[run.data.tags["fewscan.stage"]].run_id
    assert stages_linked == ["meta-train", "episodes", "ingest"]
    # the chain run links every stage run
    parent_note = c.get_run(chain.parent_run_id).data.tags["mlflow.note.content"]
    assert re.findall(r"^- ([\w-]+): \[(\w+)\]\(#/experiments/\w+/runs/(\w+)\?", parent_note, re.M) == [
        (stage, o.run_id, o.run_id) for stage, o in chain.outcomes.items()
    ]
    # episodes links only ingest
    ep_note = c.get_run(chain.outcomes["episodes"].run_id).data.tags["mlflow.note.content"]
    assert re.findall(r"runs/(\w+)\?workflowType", ep_note) == [chain.outcomes["ingest"].run_id]
    # evaluate's holds its report, a link to it rendered, and its plot
    rid = chain.outcomes["evaluate"].run_id
    note = tracking.client().get_run(rid).data.tags["mlflow.note.content"]
    assert REPORT in note
    assert ui_view.artifact_path(chain.experiment_id, rid, "report.md") in note
    # the plot, as a preview narrow enough for the page (the UI cannot size an image)
    assert f"](get-artifact?path=plots%2Fpreview%2Fper_condition.png&run_uuid={rid})" in note
    preview = tracking.UpstreamRun.from_id(rid).artifact("plots/preview/per_condition.png")
    with Image.open(preview) as im:
        assert im.size == (ui_view.PREVIEW_WIDTH, ui_view.PREVIEW_WIDTH // 2)


def test_view_state_merges_key_metrics_in_column_order() -> None:
    first = ui_view.view_state(None, ["stage_seconds", "maml.best_val_acc_seed_mean", "maml.train_loss"])
    assert json.loads(first)["selectedColumns"] == [
        "metrics.`maml.best_val_acc_seed_mean`",
        "attributes.`Description`",
    ]
    later = ui_view.view_state(
        first, ["test.protonet.n_way.k5.acc", "test.protonet.n_way.k5.auc", "query_sensitivity"]
    )
    assert json.loads(later)["selectedColumns"] == [
        "metrics.`test.protonet.n_way.k5.acc`",
        "metrics.`query_sensitivity`",
        "metrics.`maml.best_val_acc_seed_mean`",
        "attributes.`Description`",
    ]
    assert ui_view.view_state(later, []) == later  # nothing new: the tag is not rewritten
    assert json.loads(ui_view.view_state("not json", ["query_sensitivity"]))["selectedColumns"][0] == (
        "metrics.`query_sensitivity`"
    )


def test_a_long_report_keeps_whole_sections_and_names_those_left_out() -> None:
    report = (
        "# T\n\n## Verdict\n\n"
        + "v" * 5000
        + "\n\n## Results\n\n| a |\n|---|\n| 1 |\n\n## Setup\n\n"
        + "s" * 900
    )
    text = ui_view.stage_description("s", "1", "r1", [], report=report)
    assert len(text) <= ui_view.MAX_DESCRIPTION
    # the long verdict does not fit and is skipped; the shorter sections after it are kept whole
    assert "v" * 10 not in text and "## Results\n\n| a |\n|---|\n| 1 |" in text and "s" * 900 in text
    assert text.endswith(ui_view.CUT_NOTE.replace("{left_out}", "Verdict"))
    # a report that fits is kept as it is, with no note
    assert ui_view.report_excerpt("# T\n\n## A\n\nshort\n", 1000) == "# T\n\n## A\n\nshort\n"


def test_run_names_are_escaped_in_links() -> None:
    md = ui_view.lineage_markdown([ui_view.Link("ingest", "study [v2] *x*", "3", "abc")])
    assert (
        md == r"Upstream: ingest [study \[v2\] \*x\*](#/experiments/3/runs/abc?workflowType=machine_learning)"
    )


def test_previews_are_narrow_copies_and_an_unreadable_plot_is_shown_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    Image.new("RGB", (2000, 1000), "white").save(tmp_path / "plots" / "wide.png")
    (tmp_path / "plots" / "broken.png").write_bytes(b"not a png")
    got = ui_view.write_previews(tmp_path, ["plots/wide.png", "plots/broken.png"])
    assert got == [f"{ui_view.PREVIEW_DIR}/wide.png", "plots/broken.png"]
    with Image.open(tmp_path / got[0]) as im:
        assert im.format == "PNG" and im.size == (ui_view.PREVIEW_WIDTH, ui_view.PREVIEW_WIDTH // 2)
    assert sorted(p.name for p in (tmp_path / ui_view.PREVIEW_DIR).iterdir()) == ["wide.png"]  # no temp left
