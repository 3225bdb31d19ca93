"""`fewscan gc`: what it lists, what it removes, what it never touches, and the bytes it reports."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline import gc_runs, tracking
from pipeline.chain import StageFailed, run_chain
from pipeline.cli import main
from pipeline.ingest import cache_prune

from . import fake_stages
from .test_chain import fake_suite  # noqa: F401 - the fake-stage suite fixture

STAGES = ("ingest", "episodes", "meta-train", "adapt", "evaluate")


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _du(root: Path) -> int:
    return sum(_files(root).values())


def _ids(res) -> set[str]:  # type: ignore[no-untyped-def]
    return {o.run_id for o in res.outcomes.values()} | {res.parent_run_id}


def test_dry_run_lists_exactly_the_older_force_copies_and_changes_nothing(
    fake_suite: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = run_chain(str(fake_suite))
    second = run_chain(str(fake_suite), force=True)
    assert not (_ids(first) & _ids(second))  # --force made new runs of every stage
    art = fake_suite.parent / "mlflow" / "artifacts"
    before = _files(art)

    plan = gc_runs.plan("fake")
    assert {d.run.run_id for d in plan.doomed} == _ids(first)
    c = tracking.client()
    for d in plan.doomed:
        local = gc_runs.local_dir(d.run)
        assert local is not None and d.nbytes == _du(local)
        if d.run.stage != "chain":  # every stage run wrote out.json and its config
            assert d.nbytes > 0 and d.reason.startswith("superseded by ")
    assert plan.nbytes == sum(d.nbytes for d in plan.doomed) > 0

    capsys.readouterr()
    assert main(["gc", str(fake_suite)]) == 0
    out = capsys.readouterr().out
    for rid in _ids(first):
        assert rid in out
    for rid in _ids(second):
        assert rid not in out
    assert (
        f"would free {gc_runs.human(plan.nbytes)} ({plan.nbytes} bytes: runs {plan.nbytes}, decode cache 0)"
        in out
    )
    assert "nothing was changed" in out
    assert _files(art) == before
    for rid in _ids(first):
        run = c.get_run(rid)
        assert run.info.lifecycle_stage == "active" and gc_runs.TAG_GC not in run.data.tags


def test_delete_frees_the_listed_bytes_and_the_newest_chain_is_still_reused(
    fake_suite: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = run_chain(str(fake_suite))
    second = run_chain(str(fake_suite), force=True)
    art = fake_suite.parent / "mlflow" / "artifacts"
    planned = gc_runs.plan("fake").nbytes
    before = _du(art)

    capsys.readouterr()
    assert main(["gc", str(fake_suite), "--delete"]) == 0
    out = capsys.readouterr().out
    freed = before - _du(art)
    assert freed == planned > 0
    assert f"freed {gc_runs.human(freed)} ({freed} bytes: runs {freed}, decode cache 0)" in out

    c = tracking.client()
    for rid in _ids(first):
        run = c.get_run(rid)
        assert run.info.lifecycle_stage == "deleted"
        assert "fewscan gc" in run.data.tags[gc_runs.TAG_GC]
        assert not (art / run.info.experiment_id / rid).exists()
    for rid in _ids(second):
        assert c.get_run(rid).info.lifecycle_stage == "active"
    # the newest chain is intact: a following run reuses every stage and computes nothing
    fake_stages.CALLS.clear()
    third = run_chain(str(fake_suite))
    assert fake_stages.CALLS == []
    assert {s: o.run_id for s, o in third.outcomes.items()} == {
        s: o.run_id for s, o in second.outcomes.items()
    }
    # and nothing is left to collect (the third chain is the newest chain and names the same runs)
    assert gc_runs.plan("fake").doomed == []


def test_registered_models_keep_their_runs_and_upstream(fake_suite: Path) -> None:  # noqa: F811
    first = run_chain(str(fake_suite))
    c = tracking.client()
    ids1 = {s: o.run_id for s, o in first.outcomes.items()}
    meta_src = c.get_run(ids1["meta-train"]).info.artifact_uri
    c.create_registered_model("fake-meta")
    mv = c.create_model_version("fake-meta", meta_src, run_id=ids1["meta-train"])
    c.set_registered_model_alias("fake-meta", "champion", mv.version)  # kept by its alias alone (below)
    # an un-aliased version that a newer version supersedes does not keep its run
    c.create_registered_model("fake-eval")
    c.create_model_version("fake-eval", "x", run_id=ids1["evaluate"])
    second = run_chain(str(fake_suite), force=True)
    ids2 = {s: o.run_id for s, o in second.outcomes.items()}
    c.create_model_version("fake-eval", "y", run_id=ids2["evaluate"])
    c.create_model_version("fake-meta", "z", run_id=ids2["meta-train"])  # the newest version: another run

    plan = gc_runs.plan("fake")
    doomed = {d.run.run_id: d for d in plan.doomed}
    # the aliased meta-train run and everything it was built from survive; so does its parent chain
    for stage in ("ingest", "episodes", "meta-train"):
        assert ids1[stage] not in doomed
    assert first.parent_run_id not in doomed
    assert set(doomed) == {ids1["adapt"], ids1["evaluate"]}
    assert doomed[ids1["evaluate"]].versions == [("fake-eval", "1")]

    gc_runs.delete(plan)
    assert [str(v.version) for v in c.search_model_versions("name = 'fake-eval'")] == ["2"]
    assert {str(v.version) for v in c.search_model_versions("name = 'fake-meta'")} == {"1", "2"}
    assert c.get_run(ids1["meta-train"]).info.lifecycle_stage == "active"
    assert tracking.UpstreamRun.from_id(ids1["meta-train"]).read_json("out.json")["stage"] == "meta-train"


def test_live_runs_failed_runs_and_the_run_to_resume(fake_suite: Path) -> None:  # noqa: F811
    first = run_chain(str(fake_suite))
    run_chain(str(fake_suite), force=True)
    with pytest.raises(StageFailed):
        run_chain(str(fake_suite), overrides=["evaluate.fail=true"], force=True)
    c = tracking.client()
    ids1 = {s: o.run_id for s, o in first.outcomes.items()}
    # a live stage run (its process, this one, holds the lease) consuming the first chain's episodes
    episodes1 = tracking.UpstreamRun.from_id(ids1["episodes"], "episodes")
    with tracking.stage_run(
        "meta-train",
        run_name="live",
        config={},
        upstream={"episodes": episodes1},
        fp="l" * 24,
        suite="fake",
        dataset="fakedata",
    ) as live:
        plan = gc_runs.plan("fake")
        doomed = {d.run.run_id: d for d in plan.doomed}
        assert live.run_id not in doomed
        assert ids1["episodes"] not in doomed and ids1["ingest"] not in doomed  # what the live run reads
        assert ids1["meta-train"] in doomed  # superseded, and nothing live needs it
        states = {d.run.status for d in plan.doomed}
        assert "RUNNING" not in states and "FAILED" in states
        failed_eval = [d for d in plan.doomed if d.run.status == "FAILED"]
        assert [d.run.stage for d in failed_eval] == ["evaluate"] and failed_eval[0].reason == "FAILED"
        gc_runs.delete(plan)
        assert c.get_run(live.run_id).info.status == "RUNNING"
    assert c.get_run(ids1["episodes"]).info.lifecycle_stage == "active"

    # a FAILED meta-train newer than the newest finished one is what --resume continues: kept
    with pytest.raises(StageFailed):
        run_chain(str(fake_suite), overrides=["meta_train.fail=true"], force=True)
    resumable = tracking.latest_unfinished("meta-train", "fake")
    (failed_mt,) = c.search_runs(
        [tracking.experiment_id("fewscan/fake")],
        "tags.`fewscan.stage` = 'meta-train' and attributes.status = 'FAILED'",
    )
    assert resumable == failed_mt.info.run_id
    assert resumable not in {d.run.run_id for d in gc_runs.plan("fake").doomed}


def test_other_users_and_other_experiments_are_never_candidates(
    tmp_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a server: only experiments this user created, and in them only this user's runs."""
    c = tracking.client()
    mine = tracking.experiment_id("fewscan/fake")
    theirs = tracking.experiment_id("fewscan/theirs")

    def stage_run(exp: str, user: str, start: int) -> str:
        tags = {tracking.TAG_STAGE: "ingest", tracking.TAG_USER: user}
        run = c.create_run(exp, start_time=start, tags=tags)
        c.set_terminated(run.info.run_id, "FINISHED")
        return str(run.info.run_id)

    bob_old = stage_run(mine, "bob", 1000)
    alice_old = stage_run(mine, "alice", 2000)
    alice_new = stage_run(mine, "alice", 3000)
    stranger_old = stage_run(theirs, "alice", 1000)
    stage_run(theirs, "alice", 2000)
    monkeypatch.setattr(tracking.owners, "server_user", lambda: "alice")
    monkeypatch.setattr(tracking.owners, "is_owned", lambda exp, user: exp.name == "fewscan/fake")

    doomed = {d.run.run_id for d in gc_runs.plan(None).doomed}
    assert doomed == {alice_old}
    assert bob_old not in doomed and stranger_old not in doomed and alice_new not in doomed


def test_a_run_that_became_an_upstream_after_the_plan_is_left_alone(fake_suite: Path) -> None:  # noqa: F811
    first = run_chain(str(fake_suite))
    run_chain(str(fake_suite), force=True)
    plan = gc_runs.plan("fake")
    ingest1 = first.outcomes["ingest"].run_id
    assert ingest1 in {d.run.run_id for d in plan.doomed}
    # between the listing and the deletion, an episodes run starts from the old ingest run (`--from`)
    up = {"ingest": tracking.UpstreamRun.from_id(ingest1, "ingest")}
    with tracking.stage_run(
        "episodes", run_name="late", config={}, upstream=up, fp="e" * 24, suite="fake", dataset="fakedata"
    ):
        pass
    n, _freed = gc_runs.delete(plan)
    assert n == len(plan.doomed) - 1
    c = tracking.client()
    assert c.get_run(ingest1).info.lifecycle_stage == "active"
    assert up["ingest"].read_json("out.json")["stage"] == "ingest"
    assert c.get_run(first.outcomes["episodes"].run_id).info.lifecycle_stage == "deleted"


def test_an_interrupted_delete_is_finished_by_the_next_gc(fake_suite: Path) -> None:  # noqa: F811
    first = run_chain(str(fake_suite))
    run_chain(str(fake_suite), force=True)
    c = tracking.client()
    rid = first.outcomes["ingest"].run_id
    local = Path(c.get_run(rid).info.artifact_uri.removeprefix("file://"))
    size = _du(local)
    # killed between deleting the run and removing its files
    c.set_tag(rid, gc_runs.TAG_GC, "artifacts removed by fewscan gc at (interrupted)")
    c.delete_run(rid)
    plan = gc_runs.plan("fake")
    assert [r.run_id for r in plan.leftovers] == [rid]
    _n, freed = gc_runs.delete(plan)
    assert not local.exists()
    assert freed == size + sum(d.nbytes for d in plan.doomed)


# ----------------------------------------------------------------------------------- decode cache
def _entry(root: Path, i: int, size: int, age_days: float, now: float) -> Path:
    key = f"{i:040x}"
    p = root / key[:2] / f"{key}.fsc"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x" * size)
    t = now - age_days * 86400
    os.utime(p, (t, t))
    return p


def test_cache_pruning_by_age_and_size_keeps_the_newest(tmp_path: Path) -> None:
    now = time.time()
    cache = tmp_path / "cache"
    paths = [_entry(cache, i, 100 * (i + 1), age_days=i, now=now) for i in range(6)]  # 0 newest
    (cache / "notes.txt").write_text("not an entry")
    (cache / "zz").mkdir()
    (cache / "zz" / ("f" * 40 + ".fsc")).write_text("not in a cache folder")
    found = cache_prune.entries(cache)
    assert sorted(e.path for e in found) == sorted(paths)

    by_age = cache_prune.select(found, None, 2.5, now=now)
    assert sorted(e.path for e in by_age) == paths[3:]
    # 100 + 200 + 300 = 600 fit in 650; 400 more would not, and nothing older is kept after it
    by_size = cache_prune.select(found, 650, None, now=now)
    assert sorted(e.path for e in by_size) == paths[3:]
    both = cache_prune.select(found, 350, 4.5, now=now)
    assert sorted(e.path for e in both) == paths[2:]
    assert cache_prune.select(found, None, None, now=now) == []

    before = _du(cache)
    freed = cache_prune.remove(both)
    assert freed == sum(e.nbytes for e in both) == before - _du(cache) == 300 + 400 + 500 + 600
    assert [p.exists() for p in paths] == [True, True, False, False, False, False]
    assert (cache / "notes.txt").exists()
    assert cache_prune.remove(both) == 0  # already gone: nothing counted twice


def test_gc_command_prunes_the_cache_and_rejects_bad_flags(
    tmp_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    cache = tmp_store / "c"
    paths = [_entry(cache, i, 1000, age_days=i, now=now) for i in range(5)]
    assert main(["gc", "--cache-dir", str(cache), "--cache-max-bytes", "2.5K"]) == 0
    out = capsys.readouterr().out
    assert "decode cache" in out and "5 entries" in out and "3 to remove" in out
    assert all(p.exists() for p in paths)  # a dry run
    assert main(["gc", "--cache-dir", str(cache), "--cache-max-bytes", "2.5K", "--delete"]) == 0
    out = capsys.readouterr().out
    assert "freed 2.9 KB (3000 bytes: runs 0, decode cache 3000)" in out
    assert [p.exists() for p in paths] == [True, True, False, False, False]

    assert main(["gc", "--cache-max-bytes", "lots"]) == 2
    assert "--cache-max-bytes 'lots' is not a size" in capsys.readouterr().err
    assert main(["gc", "--cache-max-age", "-1"]) == 2
    assert "--cache-max-age must be a number of days >= 0" in capsys.readouterr().err
    assert cache_prune.parse_size("2G") == 2 * 1024**3 and cache_prune.parse_size("1.5kb") == 1536


def test_gc_suite_uses_the_decode_cache_its_manifest_names(
    fake_suite: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = time.time()
    manifest = fake_suite.parent / "m.yaml"
    _entry(fake_suite.parent / "elsewhere", 1, 700, age_days=9, now=now)
    manifest.write_text("name: fakedata\nsize: 8\ncache_dir: elsewhere\n")
    assert main(["gc", str(fake_suite), "--cache-max-age", "5"]) == 0
    assert "decode cache elsewhere: 1 entries, 700 B; 1 to remove" in capsys.readouterr().out
    manifest.write_text("name: fakedata\nsize: 8\ncache_dir: null\n")
    assert main(["gc", str(fake_suite)]) == 0
    assert "decode cache: disabled by the suite's data manifest" in capsys.readouterr().out
