"""Two chains at once compute each stage once (pipeline/claims.py): a live run computing the same stage is
waited for and reused; a dead one does not block; --force never waits; a wait can time out."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities import ViewType

from pipeline import claims, stages, tracking, ui_view
from pipeline.chain import run_chain
from pipeline.cli import main
from pipeline.suite import load_suite

from . import fake_stages
from .test_chain import fake_suite  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import sys, time
from pathlib import Path
import pytest
from tests.foundation import fake_stages
from pipeline import tracking
from pipeline.chain import run_chain

fake_stages.install(pytest.MonkeyPatch())  # as the fixture `fake_suite` does


def slow(stage, execute):
    def run_stage(cfg, run, up):
        time.sleep(1.0)  # long enough for the other chain to arrive while this stage is computed
        result = execute(cfg, run, up)
        if stage == "adapt":  # as the real adapt stage does: register the adapted model
            (run.outdir / "model").mkdir()
            (run.outdir / "model" / "weights.txt").write_text("w")
            run.log_artifact(run.outdir / "model", "model")
            run.register_model("model", "fewscan-fake-adapted")
        return result
    return run_stage


for name, mod in fake_stages.MODULES.items():
    mod.execute = slow(name, mod.execute)
tracking.client()
Path(f"ready-{sys.argv[2]}").touch()
while not Path("go").exists():  # everything imported and the store open: start together
    time.sleep(0.02)
run_chain(sys.argv[1])
"""


def _stage_runs(view: int = ViewType.ACTIVE_ONLY) -> list:
    c = tracking.client()
    exps = [e.experiment_id for e in c.search_experiments()]
    return [r for r in c.search_runs(exps, "", run_view_type=view) if "fewscan.stage" in r.data.tags]


def test_two_chains_started_together_compute_each_stage_once(fake_suite: Path) -> None:  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEWSCAN_WAIT_POLL_S": "0.2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cwd = fake_suite.parent
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(fake_suite), str(i)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 240
    while not all((cwd / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.communicate()[1][-3000:] for p in procs if p.poll() is not None
        ]
        time.sleep(0.05)
    (cwd / "go").touch()
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    text = "".join(out + err for out, err in outs)

    # each stage computed once, in all: one stage run each (no second copy, no half-done leftover)
    computed = [line.split(" finished in ")[0] for out, _ in outs for line in out.splitlines()]
    assert sorted(s for s in computed if s in stages.ORDER) == sorted(stages.ORDER), text
    runs = _stage_runs()
    by_stage: dict[str, list[str]] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["fewscan.stage"], []).append(r.info.status)
    assert by_stage == {s: ["FINISHED"] for s in stages.ORDER}, text
    # both chains link the same five runs
    c = tracking.client()
    exps = [e.experiment_id for e in c.search_experiments()]
    parents = c.search_runs(exps, "tags.`fewscan.chain` = 'true'")
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    links = [{s: p.data.tags[f"fewscan.run.{s}"] for s in stages.ORDER} for p in parents]
    assert links[0] == links[1] == {r.data.tags["fewscan.stage"]: r.info.run_id for r in runs}
    # the chain that arrived second said that it waited, and reused what the other computed
    assert "waiting for run" in text and "computed the same" not in text
    assert "computed meanwhile by another chain" in text
    # a claim that lost was withdrawn: KILLED, its reason given, deleted (not shown as a stage's run)
    for r in _stage_runs(ViewType.DELETED_ONLY):
        assert r.info.status == "KILLED" and r.data.tags["fewscan.error"].startswith("superseded by run ")
    # the adapted model was registered once
    versions = c.search_model_versions("name = 'fewscan-fake-adapted'")
    assert [v.run_id for v in versions] == [links[0]["adapt"]]


# ----------------------------------------------------------------------------- in one process
def _ingest_fp(suite_path: Path) -> str:
    cfg = load_suite(str(suite_path)).stage_config("ingest")
    return stages.stage_fingerprint("ingest", cfg, {})


@pytest.fixture
def holder(fake_suite: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:  # noqa: F811
    """A live run of this process computing the suite's ingest (same fingerprint) in a thread, until
    `release` is set; `done` is set when it has FINISHED."""
    monkeypatch.setattr(claims, "POLL_S", 0.1)
    fp = _ingest_fp(fake_suite)
    state: dict = {"release": threading.Event(), "done": threading.Event(), "fp": fp}
    started = threading.Event()

    def hold() -> None:
        with tracking.stage_run(
            "ingest", run_name="other", config={}, upstream={}, fp=fp, suite="fake", dataset="fakedata"
        ) as run:
            state["run_id"] = run.run_id
            (run.outdir / "out.json").write_text('{"stage": "ingest", "by": "other"}')
            started.set()
            state["release"].wait(60)
        state["done"].set()

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert started.wait(60)
    try:
        yield state
    finally:
        state["release"].set()
        t.join(60)


def test_a_chain_waits_for_the_live_run_computing_its_stage_and_reuses_it(
    fake_suite: Path,  # noqa: F811
    holder: dict,
    capsys: pytest.CaptureFixture[str],
) -> None:
    threading.Timer(1.0, holder["release"].set).start()
    res = run_chain(str(fake_suite))
    assert holder["done"].is_set()
    assert res.outcomes["ingest"].reused and res.outcomes["ingest"].run_id == holder["run_id"]
    assert fake_stages.CALLS == ["episodes", "meta-train", "adapt", "evaluate"]  # ingest not recomputed
    # downstream really consumed the other run's result
    seen = tracking.UpstreamRun.from_id(res.outcomes["episodes"].run_id).read_json("out.json")["seen"]
    assert seen["ingest"]["by"] == "other"
    cap = capsys.readouterr()
    line = next(x for x in cap.err.splitlines() if "waiting for run" in x)
    assert f"waiting for run {holder['run_id']} (started by pid {os.getpid()} on this host" in line
    assert line.endswith("s so far") and "computing the same ingest" in line
    assert f"ingest: reusing finished run {holder['run_id']} (computed meanwhile by another chain" in cap.out


def test_force_never_waits(fake_suite: Path, holder: dict, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    res = run_chain(str(fake_suite), force=True)
    assert not holder["done"].is_set()  # the other run is still computing
    assert fake_stages.CALLS == list(stages.ORDER)
    assert res.outcomes["ingest"].run_id != holder["run_id"]
    assert "waiting for run" not in capsys.readouterr().err


def test_wait_timeout_stops_the_chain_naming_the_run_and_the_fix(
    fake_suite: Path,  # noqa: F811
    holder: dict,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(
        claims.WaitTimeout, match=f"run {holder['run_id']} is still computing the same ingest"
    ):
        run_chain(str(fake_suite), wait_timeout_s=0.3)
    capsys.readouterr()
    assert main(["run", str(fake_suite), "--wait-timeout", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--wait-timeout 0.3" in err and "--force" in err and "Traceback" not in err
    assert main(["run", str(fake_suite), "--wait-timeout", "-1"]) == 2
    assert "give a number of seconds >= 0" in capsys.readouterr().err
    assert fake_stages.CALLS == []
    # no stage run was left behind by the chains that gave up
    assert [r.info.run_id for r in _stage_runs()] == [holder["run_id"]]
    # `fewscan status` says that the stage is being computed and that `fewscan run` would wait for it
    assert main(["status", str(fake_suite)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["ingest"].endswith(
        f"when run {holder['run_id']} finishes (running now; `fewscan run` waits for it)"
    )
    assert "RUNNING" in rows["ingest"] and rows["episodes"].endswith("no: an upstream stage would rerun")


def test_a_dead_claim_does_not_block(
    fake_suite: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(claims, "POLL_S", 0.1)
    fp = _ingest_fp(fake_suite)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    c = tracking.client()  # opened first: these runs are made after the check every command does
    stale = str(int(time.time() - tracking.LEASE_TIMEOUT_S - 60))
    dead_ids = []
    for host, pid, beat in (
        (socket.gethostname(), str(gone.pid), str(int(time.time()))),  # its process is gone
        ("elsewhere", "1", stale),  # another host's run that stopped beating
    ):
        tags = {
            tracking.TAG_STAGE: "ingest",
            tracking.TAG_FINGERPRINT: fp,
            tracking.TAG_HOST: host,
            tracking.TAG_PID: pid,
            tracking.TAG_HEARTBEAT: beat,
            claims.TAG_CLAIM: "1",
        }
        exp = tracking.experiment_id(tracking.experiment_name("fake", "fakedata"))
        dead_ids.append(c.create_run(exp, tags=tags).info.run_id)
    assert tracking.running_with_fingerprint("ingest", fp, suite="fake", dataset="fakedata") == []
    res = run_chain(str(fake_suite), wait_timeout_s=30)
    assert fake_stages.CALLS == list(stages.ORDER)
    assert res.outcomes["ingest"].run_id not in dead_ids
    assert "waiting for run" not in capsys.readouterr().err


def _claim_run(fp: str, claim: str | None) -> str:
    """A live RUNNING ingest run of this process with fingerprint `fp` and claim tag `claim` (None: none)."""
    tags = tracking.stage_tags(
        "ingest", fp=fp, upstream={}, suite="fake", dataset="fakedata", parent_run_id=None
    )
    if claim is not None:
        tags[claims.TAG_CLAIM] = claim
    return str(tracking.create_stage_run(tags, "claim", "fake", "fakedata").info.run_id)


def test_the_smallest_ticket_computes_and_a_run_without_a_claim_comes_first(
    fake_suite: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(claims, "POLL_S", 0.05)
    c = tracking.client()
    fp = "d" * 24
    first = _claim_run(fp, "1")
    mine = _claim_run(fp, claims.CHOOSING)
    assert claims._contend("ingest", fp, mine, suite="fake", dataset="fakedata") == first
    assert c.get_run(mine).data.tags[claims.TAG_CLAIM] == "2"  # one above the largest ticket seen
    c.set_terminated(first, "FAILED")  # the claim ahead failed: the next one computes
    assert claims._contend("ingest", fp, mine, suite="fake", dataset="fakedata") is None
    # a live run that computes regardless (a single-stage command, a resume) is ahead of every claim
    fp2 = "e" * 24
    plain = _claim_run(fp2, None)
    other = _claim_run(fp2, claims.CHOOSING)
    assert claims._contend("ingest", fp2, other, suite="fake", dataset="fakedata") == plain
    # and a finished run ends every contention: it is reused
    c.set_terminated(plain, "FINISHED")
    assert claims._contend("ingest", fp2, other, suite="fake", dataset="fakedata") == plain


def test_a_claim_still_choosing_is_waited_out_and_a_tie_goes_to_the_smaller_run_id(
    fake_suite: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two claims that read each other before either took a ticket take the same ticket."""
    monkeypatch.setattr(claims, "POLL_S", 0.05)
    c = tracking.client()
    fp = "f" * 24
    other = _claim_run(fp, claims.CHOOSING)
    mine = _claim_run(fp, claims.CHOOSING)
    set_tag = tracking.set_run_tag
    took: list[float] = []

    def take_ticket(run_id: str, key: str, value: str) -> None:
        set_tag(run_id, key, value)
        # this claim has read the store and taken its ticket; the other takes its own (1: it saw no
        # ticket either) a moment later
        took.append(time.monotonic())
        threading.Timer(0.5, lambda: c.set_tag(other, claims.TAG_CLAIM, "1")).start()

    monkeypatch.setattr(tracking, "set_run_tag", take_ticket)
    got = claims._contend("ingest", fp, mine, suite="fake", dataset="fakedata")
    assert time.monotonic() - took[0] >= 0.5  # waited while the other was choosing
    assert c.get_run(mine).data.tags[claims.TAG_CLAIM] == "1"
    assert got == (other if other < mine else None)


def test_a_claim_interrupted_while_choosing_is_withdrawn(
    fake_suite: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "set_run_tag", interrupted)  # the ticket is never written
    with pytest.raises(KeyboardInterrupt):
        run_chain(str(fake_suite))
    assert _stage_runs() == []  # nothing RUNNING or KILLED left visible as the ingest run
    (gone,) = _stage_runs(ViewType.DELETED_ONLY)
    assert gone.info.status == "KILLED"
    assert gone.data.tags["fewscan.error"] == "stopped while claiming the ingest: KeyboardInterrupt: "


def test_an_experiment_tag_written_by_another_command_at_the_same_time_is_no_error(
    tmp_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two chains opening a fresh experiment both insert its tags; the database refuses the second insert."""
    from mlflow.exceptions import MlflowException

    c = tracking.client()
    exp = c.create_experiment("fewscan/tags")
    real = c.set_experiment_tag
    calls: list[str] = []

    def other_was_first(exp_id: str, key: str, value: str) -> None:
        calls.append(value)
        if len(calls) == 1:  # the other command's insert lands first; ours is refused
            real(exp_id, key, "theirs")
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: experiment_tags.key")
        real(exp_id, key, value)

    monkeypatch.setattr(c, "set_experiment_tag", other_was_first)
    tracking.present_experiment(exp)  # what every command does when it opens the suite's experiment
    assert (
        calls == [ui_view.KIND, ui_view.KIND] and c.get_experiment(exp).tags[ui_view.TAG_KIND] == ui_view.KIND
    )

    def refused(exp_id: str, key: str, value: str) -> None:
        raise MlflowException("refused for another reason")

    monkeypatch.setattr(c, "set_experiment_tag", refused)
    with pytest.raises(MlflowException, match="refused for another reason"):
        tracking.set_experiment_tag(exp, "k2", "v", "tag")  # the tag is not there: a real error
