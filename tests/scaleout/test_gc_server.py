"""`fewscan gc` against a basic-auth `mlflow server` with proxied artifacts: it removes the user's own
superseded runs through the server (their bytes counted from the server's listing and this machine's
download cache) and never touches another user's runs, in the user's experiment or in his own."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_tracking_server import Server, _create_user, _grant, become_user, server  # noqa: F401 - the server fixture

pytestmark = pytest.mark.e2e


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_gc_on_a_server_removes_only_the_users_own_superseded_runs(
    server: Server,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline import gc_runs, tracking

    pw = {u: _create_user(server, u) for u in ("gc-alice", "gc-bob")}
    monkeypatch.chdir(tmp_path)

    def become(user: str) -> None:
        become_user(monkeypatch, server, user, pw[user], tmp_path)

    def ingest(suite: str, payload: str) -> str:
        with tracking.stage_run(
            "ingest", run_name="i", config={}, upstream={}, fp="g" * 24, suite=suite, dataset="gcdata"
        ) as run:
            (run.outdir / "store").mkdir()
            (run.outdir / "store" / "images.bin").write_text(payload)
            return run.run_id

    # Bob's own suite: an older and a newer ingest run
    become("gc-bob")
    bob_old = ingest("gc-bob-suite", "b" * 3000)
    ingest("gc-bob-suite", "b" * 10)
    # Alice's suite: an older and a newer ingest run; she lets Bob write into it, and he adds an old-style
    # run of his own there
    become("gc-alice")
    alice_old = ingest("gc-alice-suite", "a" * 5000)
    alice_new = ingest("gc-alice-suite", "a" * 10)
    exp = tracking.experiment_id("fewscan/gc-alice-suite")
    _grant(server, ("gc-alice", pw["gc-alice"]), "gc-bob", exp, "EDIT")
    become("gc-bob")
    c = tracking.client()
    bobs_in_hers = c.create_run(
        exp, start_time=1000, tags={"fewscan.stage": "ingest", "mlflow.user": "gc-bob"}
    )
    c.set_terminated(bobs_in_hers.info.run_id, "FAILED")

    become("gc-alice")
    # this machine downloaded the old run's store once: its copy goes too, and counts
    tracking.UpstreamRun.from_id(alice_old, "ingest").artifact("store")
    cached = tmp_path / ".fewscan" / "cache" / alice_old
    assert cached.is_dir()
    art = server.root / "art"
    before = _files(art)

    plan = gc_runs.plan(None)
    assert [d.run.run_id for d in plan.doomed] == [alice_old]
    stored = sum(n for path, n in before.items() if alice_old in path)
    assert plan.doomed[0].nbytes == stored + 5000 > 10000  # the server's files (store + config) + the copy

    n, freed = gc_runs.delete(plan)
    assert (n, freed) == (1, plan.nbytes)
    after = _files(art)
    assert not any(alice_old in path for path in after)
    assert {p: s for p, s in before.items() if alice_old not in p} == after  # nobody else's files moved
    assert not cached.exists()
    c = tracking.client()
    assert c.get_run(alice_old).info.lifecycle_stage == "deleted"
    for rid in (alice_new, bob_old, bobs_in_hers.info.run_id):
        assert c.get_run(rid).info.lifecycle_stage == "active"
