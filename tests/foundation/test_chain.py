"""The chain machinery with fake stages: tags, links, reuse, downstream-only recompute, failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import stages, tracking
from pipeline.chain import StageFailed, run_chain
from pipeline.cli import main

from . import fake_stages

SUITE = """
name: fake
dataset: {manifest}
episodes: {{value: 1}}
meta_train: {{value: 1}}
adapt: {{value: 1}}
evaluate: {{value: 1}}
"""


@pytest.fixture
def fake_suite(tmp_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake_stages.install(monkeypatch)
    fake_stages.CALLS.clear()
    (tmp_store / "m.yaml").write_text("name: fakedata\nsize: 8\n")
    suite = tmp_store / "suite.yaml"
    suite.write_text(SUITE.format(manifest=tmp_store / "m.yaml"))
    return suite


def _runs(stage: str) -> list:
    c = tracking.client()
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps, f"tags.`fewscan.stage` = '{stage}'")


def test_chain_links_five_runs_with_tags(fake_suite: Path) -> None:
    res = run_chain(str(fake_suite))
    assert fake_stages.CALLS == ["ingest", "episodes", "meta-train", "adapt", "evaluate"]
    ids = {s: o.run_id for s, o in res.outcomes.items()}
    c = tracking.client()
    for stage, rid in ids.items():
        run = c.get_run(rid)
        assert run.info.status == "FINISHED"
        assert run.data.tags["fewscan.stage"] == stage
        assert run.data.tags["mlflow.parentRunId"] == res.parent_run_id
        assert len(run.data.tags["fewscan.fingerprint"]) == 24
        for up in stages.UPSTREAM[stage]:
            assert run.data.tags[f"fewscan.upstream.{up}"] == ids[up]
        assert "finished in" in run.data.tags["mlflow.note.content"]
    # the evaluate stage really read the meta-train run's artifact through the upstream link
    out = tracking.UpstreamRun.from_id(ids["evaluate"]).read_json("out.json")
    assert out["seen"]["meta-train"]["stage"] == "meta-train"
    # the validated config is logged as params and as a YAML artifact
    ep = c.get_run(ids["episodes"])
    assert ep.data.params["value"] == "1"
    assert (
        (tracking.UpstreamRun.from_id(ids["episodes"]).artifact("config/episodes.yaml")).read_text().strip()
    )


def test_second_run_reuses_everything_and_change_reruns_downstream_only(fake_suite: Path, capsys) -> None:
    first = run_chain(str(fake_suite))
    fake_stages.CALLS.clear()
    second = run_chain(str(fake_suite))
    assert fake_stages.CALLS == []
    assert all(o.reused for o in second.outcomes.values())
    assert {s: o.run_id for s, o in second.outcomes.items()} == {
        s: o.run_id for s, o in first.outcomes.items()
    }
    assert "reusing finished run" in capsys.readouterr().out

    fake_stages.CALLS.clear()
    third = run_chain(str(fake_suite), overrides=["meta_train.value=2"])
    assert fake_stages.CALLS == ["meta-train", "adapt", "evaluate"]
    assert third.outcomes["ingest"].reused and third.outcomes["episodes"].reused
    assert third.outcomes["ingest"].run_id == first.outcomes["ingest"].run_id
    assert third.outcomes["evaluate"].run_id != first.outcomes["evaluate"].run_id

    fake_stages.CALLS.clear()
    run_chain(str(fake_suite), force=True)
    assert fake_stages.CALLS == ["ingest", "episodes", "meta-train", "adapt", "evaluate"]


def test_failed_stage_marks_run_failed_and_stops(fake_suite: Path) -> None:
    with pytest.raises(
        StageFailed, match="stage 'meta-train' failed: RuntimeError: meta-train was told to fail"
    ):
        run_chain(str(fake_suite), overrides=["meta_train.fail=true"])
    assert fake_stages.CALLS == ["ingest", "episodes", "meta-train"]
    (failed,) = _runs("meta-train")
    assert failed.info.status == "FAILED"
    assert "told to fail" in failed.data.tags["fewscan.error"]
    assert (
        tracking.UpstreamRun(failed.info.run_id, "meta-train", {}, {}, failed.info.artifact_uri)
        .artifact("error.txt")
        .read_text()
        .startswith("RuntimeError")
    )
    c = tracking.client()
    parent = c.get_run(failed.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    assert _runs("evaluate") == []


def test_cli_exit_codes(fake_suite: Path, capsys) -> None:
    assert main(["run", str(fake_suite), "--set", "meta_train.fail=true"]) == 1
    err = capsys.readouterr().err
    assert "stage 'meta-train' failed" in err and "Traceback" not in err
    assert main(["run", str(fake_suite), "--set", "episodes.nosuchkey=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'nosuchkey'" in err and "section 'episodes'" in err
    assert main(["episodes", str(fake_suite), "--from", "f" * 32]) == 2
    assert "no MLflow run with id" in capsys.readouterr().err


def test_single_stage_resolves_latest_upstream(fake_suite: Path) -> None:
    res = run_chain(str(fake_suite))
    assert main(["episodes", str(fake_suite)]) == 0
    runs = sorted(_runs("episodes"), key=lambda r: r.info.start_time)
    assert runs[-1].data.tags["fewscan.upstream.ingest"] == res.outcomes["ingest"].run_id
    # an explicit --from of the wrong stage is refused
    assert main(["meta-train", str(fake_suite), "--from", res.outcomes["ingest"].run_id]) == 2


def test_parent_run_logs_the_stages_public_config_not_the_raw_suite(
    fake_suite: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a stage that hides a path (like adapt's support/query) is logged hidden by the parent too
    monkeypatch.setattr(
        fake_stages.MODULES["adapt"],
        "public_config",
        lambda cfg: {"value": cfg.value, "support": "path:0123abcd"},
        raising=False,
    )
    res = run_chain(str(fake_suite))
    c = tracking.client()
    params = c.get_run(res.parent_run_id).data.params
    assert params["adapt.support"] == "path:0123abcd"
    assert params == {**params, "adapt.value": "1", "episodes.value": "1", "dataset": "fakedata"}
    assert c.get_run(res.outcomes["adapt"].run_id).data.params["support"] == "path:0123abcd"
    # no clear path anywhere in the parent's params (the suite names its manifest by path)
    assert not [v for v in params.values() if str(fake_suite.parent) in v]


def test_status_lists_latest_runs_state_and_reusability(fake_suite: Path, capsys) -> None:
    res = run_chain(str(fake_suite))
    capsys.readouterr()
    assert main(["status", str(fake_suite)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[2:]}
    assert list(rows) == ["ingest", "episodes", "meta-train", "adapt", "evaluate"]
    for stage, line in rows.items():
        assert res.outcomes[stage].run_id in line and "FINISHED" in line and line.endswith("yes"), line
    # a changed meta_train section: meta-train would rerun, and so would everything below it
    fake_suite.write_text(fake_suite.read_text().replace("meta_train: {value: 1}", "meta_train: {value: 2}"))
    tracking.client().set_terminated(res.outcomes["adapt"].run_id, "KILLED")
    assert main(["status", str(fake_suite)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["episodes"].endswith("yes")
    assert "no: config, upstream or code changed" in rows["meta-train"]
    assert "KILLED" in rows["adapt"] and "no: an upstream stage would rerun" in rows["adapt"]
    assert main(["status"]) == 0
    assert "fewscan/fake" in capsys.readouterr().out
