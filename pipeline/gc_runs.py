"""Which runs `fewscan gc` removes, and removing them (the MLflow half of `pipeline/gc.py`).

Every `--force` rerun stores another image store and another set of checkpoints, and failed or killed runs
keep what they wrote. What is kept (docs/storage.md, "What gc keeps"):

- the newest FINISHED run of each stage in each experiment, and the newest finished chain (`fewscan run`
  parent) with every run it names: what `fewscan run` reuses next time;
- every run a registered model version with an alias points at, and the newest version of each registered
  model (what `models:/NAME@ALIAS` and `models:/NAME/latest` load);
- every RUNNING run (the store was just opened, so runs of dead processes are already KILLED) and what a
  running chain names; for meta-train, the unfinished run `--resume` would continue, when it is newer than
  the stage's newest finished run;
- everything upstream of a kept run (its `fewscan.upstream.*` tags), and the chain run that is the parent
  of a kept run (so that the UI keeps its tree).

Only runs of fewscan experiments in scope are candidates: the suite's own experiment with SUITE, else every
fewscan experiment; on a tracking server only experiments this user created and, in them, only runs this
user created (tracking.search_scope's rule, docs/scaling.md "Whose runs fewscan uses"). Every other run
visible anywhere is kept, and so is everything it references: nobody's lineage loses an upstream run.

This module holds the rules; what it reads from MLflow and the deletions go through the tracking layer
(`pipeline/tracking/inventory.py`, docs/ARCHITECTURE.md principle 2). It never imports torch or mlflow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import stage_configs, tracking
from pipeline.errors import TrackingError
from pipeline.gc import human
from pipeline.progress import log, progress
from pipeline.tracking import inventory

TAG_GC = "fewscan.gc"  # set just before a run is deleted: a restored run says where its artifacts went
TAG_CHAIN = tracking.TAG_CHAIN
TAG_CHAIN_RUN = "fewscan.run."  # + stage: the run a chain used for that stage (pipeline/chain.py)
# Deleted downstream first, so that an interrupted gc never leaves a visible run whose upstream is gone.
DELETE_ORDER = ("chain", *reversed(stage_configs.ORDER))
# Stages whose newest interrupted run `fewscan <stage> --resume` would continue (meta-train): kept.
RESUMABLE = frozenset(s.name for s in stage_configs.SPECS if s.resumable)


@dataclass
class RunRec:
    """The facts gc needs about one run."""

    run_id: str
    experiment_id: str
    stage: str  # a fewscan stage, "chain" for a `fewscan run` parent, "" for anything else
    status: str
    start_time: int  # ms
    artifact_uri: str
    user_id: str
    tags: dict[str, str]
    candidate: bool = False  # in scope: gc may delete it

    @property
    def upstream_ids(self) -> list[str]:
        return [v for k, v in self.tags.items() if k.startswith(tracking.TAG_UPSTREAM) and v]

    @property
    def chain_ids(self) -> list[str]:
        return [v for k, v in self.tags.items() if k.startswith(TAG_CHAIN_RUN) and v]


@dataclass
class Doomed:
    """A run gc removes: why, how big, and the registry versions that point at it."""

    run: RunRec
    reason: str
    nbytes: int
    versions: list[tuple[str, str]] = field(default_factory=list)  # (model name, version)


@dataclass
class Plan:
    scope: list[str]  # experiment names
    doomed: list[Doomed]
    kept: int
    leftovers: list[RunRec]  # deleted by an interrupted gc, artifacts still on disk
    searched: list[str] = field(default_factory=list)  # experiment ids whose runs may reference ours
    known: set[str] = field(default_factory=set)  # every run the plan saw (its references are judged)

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.doomed)


# ----------------------------------------------------------------------------------------- reading
def _rec(run: Any) -> RunRec:
    tags = dict(run.data.tags)
    stage = tags.get(tracking.TAG_STAGE) or ("chain" if tags.get(TAG_CHAIN) == "true" else "")
    return RunRec(
        run_id=str(run.info.run_id),
        experiment_id=str(run.info.experiment_id),
        stage=stage,
        status=str(run.info.status),
        start_time=int(run.info.start_time or 0),
        artifact_uri=str(run.info.artifact_uri or ""),
        user_id=str(run.info.user_id or ""),
        tags=tags,
    )


def _runs(exp_ids: list[str], *, deleted: bool = False) -> list[RunRec]:
    return [_rec(r) for r in inventory.all_runs(exp_ids, deleted=deleted)]


# ------------------------------------------------------------------------------------------- sizes
def local_dir(rec: RunRec) -> Path | None:
    """The run's artifact folder on this machine, if it is local and has the layout MLflow gives it
    (`.../<run id>/artifacts`): gc never removes a folder a run's URI merely points at."""
    p = tracking.local_artifact_dir(rec.artifact_uri)
    if p is None:
        return None
    if p.name != "artifacts" or p.parent.name != rec.run_id:
        raise TrackingError(
            f"run {rec.run_id} keeps its artifacts in {p}, not in a folder of its own (<run id>/artifacts); "
            "fewscan gc does not remove it. Delete that run in the MLflow UI instead."
        )
    return p


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (links are not followed and count for nothing)."""
    if not path.exists():
        return 0
    if path.is_file() and not path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(root, f))
                if not os.path.islink(os.path.join(root, f)):
                    total += st.st_size
    return total


def run_bytes(rec: RunRec) -> int:
    local = local_dir(rec)
    stored = tree_bytes(local) if local is not None else inventory.remote_bytes(rec.run_id)
    return stored + tree_bytes(tracking.download_cache(rec.run_id))


# -------------------------------------------------------------------------------------------- plan
def _age(ms: int, now: float) -> str:
    days = (now - ms / 1000) / 86400
    return f"{days:.1f} d" if days >= 1 else f"{days * 24:.1f} h"


def plan(suite: str | None = None) -> Plan:
    """What `fewscan gc` would remove (nothing is changed)."""
    scope = inventory.gc_scope(suite)  # opening the store marks runs of dead processes KILLED
    exps, user = scope.every, scope.user
    scope_ids = {str(e.experiment_id) for e in scope.mine}
    runs = {r.run_id: r for r in _runs([str(e.experiment_id) for e in exps])}
    for r in runs.values():  # on a server, another user's run in our experiment is not ours to delete
        r.candidate = r.experiment_id in scope_ids and r.stage != "" and (not user or r.user_id == user)
    needed, versions = inventory.registry_needs()

    roots: set[str] = {rid for rid, r in runs.items() if not r.candidate}  # not ours to judge
    roots |= needed & runs.keys()
    # newest FINISHED run per (experiment, stage), the newest finished chain included; and the newest
    # unfinished run of each resumable stage (meta-train), which `fewscan <stage> --resume` would continue
    newest: dict[tuple[str, str], RunRec] = {}
    unfinished: dict[tuple[str, str], RunRec] = {}
    for r in runs.values():
        if not r.candidate:
            continue
        key = (r.experiment_id, r.stage)
        if r.status == "FINISHED" and (key not in newest or r.start_time > newest[key].start_time):
            newest[key] = r
        if r.stage in RESUMABLE and r.status in ("FAILED", "KILLED"):
            if key not in unfinished or r.start_time > unfinished[key].start_time:
                unfinished[key] = r
    roots |= {r.run_id for r in newest.values()}
    for key, r in unfinished.items():
        done = newest.get(key)
        if done is None or r.start_time > done.start_time:
            roots.add(r.run_id)
    children: dict[str, list[str]] = {}
    for r in runs.values():
        if parent := r.tags.get(tracking.TAG_PARENT):
            children.setdefault(parent, []).append(r.run_id)
    for r in runs.values():
        if r.status == "RUNNING":  # alive or without a lease (an older fewscan): never touched
            roots.add(r.run_id)
            roots.update(children.get(r.run_id, []))  # a running chain's stage runs

    kept: set[str] = set()
    todo = [rid for rid in roots if rid in runs]
    while todo:
        rid = todo.pop()
        if rid in kept:
            continue
        kept.add(rid)
        r = runs[rid]
        todo += [u for u in r.upstream_ids if u in runs]
        if r.stage == "chain" and rid in roots:  # a root chain's runs; a chain kept as a parent only: not
            todo += [u for u in r.chain_ids if u in runs]
    # a chain that is the parent of a kept run stays, with no more than that (its other runs may go)
    kept |= {
        p
        for rid in list(kept)
        if (p := runs[rid].tags.get(tracking.TAG_PARENT)) and p in runs and runs[p].stage == "chain"
    }

    doomed: list[Doomed] = []
    going = [r for r in runs.values() if r.candidate and r.run_id not in kept]
    for r in progress(going, total=len(going), desc="gc: measuring the runs nothing needs"):
        if r.status != "FINISHED":
            reason = r.status
        elif r.stage == "chain":
            reason = "chain whose runs all go"
        else:
            sup = newest.get((r.experiment_id, r.stage))
            reason = f"superseded by {sup.run_id[:8]}" if sup else "superseded"
        try:
            nbytes = run_bytes(r)
        except TrackingError as err:  # an artifact folder gc will not remove: the run stays, said why
            log(f"gc: keeping {r.stage} run {r.run_id}: {err}")
            continue
        doomed.append(Doomed(r, reason, nbytes, versions.get(r.run_id, [])))
    order = {stage: i for i, stage in enumerate(DELETE_ORDER)}
    doomed.sort(key=lambda d: (order.get(d.run.stage, -1), -d.run.start_time))

    # runs an interrupted gc deleted before it could remove their files (local stores: a server's
    # deleted runs are purged by the server's own `mlflow gc`)
    leftovers = []
    for r in _runs(sorted(scope_ids), deleted=True):
        if TAG_GC in r.tags and (not user or r.user_id == user):
            with contextlib.suppress(TrackingError):
                if (folder := local_dir(r)) is not None and folder.exists():
                    leftovers.append(r)
    n_kept = sum(1 for r in runs.values() if r.candidate) - len(doomed)
    searched = [str(e.experiment_id) for e in exps]
    return Plan([e.name for e in scope.mine], doomed, n_kept, leftovers, searched, set(runs))


def plan_lines(p: Plan) -> list[str]:
    now = time.time()
    rows = [("stage", "run", "state", "age", "bytes", "why")]
    for d in p.doomed:
        why = d.reason + (
            "; unregisters " + ", ".join(f"{n}/{v}" for n, v in d.versions) if d.versions else ""
        )
        rows.append(
            (d.run.stage, d.run.run_id, d.run.status, _age(d.run.start_time, now), human(d.nbytes), why)
        )
    for r in p.leftovers:
        rows.append(
            (r.stage, r.run_id, "deleted", _age(r.start_time, now), human(run_bytes(r)), "interrupted gc")
        )
    where = ", ".join(p.scope) or "no fewscan experiment"
    head = [f"runs in {where} ({tracking.tracking_uri()}): {len(rows) - 1} to remove, {p.kept} kept"]
    if len(rows) == 1:
        return head
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return head + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


# ------------------------------------------------------------------------------------------ delete
def _remove_artifacts(rec: RunRec) -> int:
    """Remove the run's artifacts (and this machine's download of them); the bytes removed."""
    freed = 0
    local = local_dir(rec)
    if local is not None:
        freed += tree_bytes(local)
        shutil.rmtree(local, ignore_errors=True)
        with contextlib.suppress(OSError):
            local.parent.rmdir()  # <run id>/, now empty
    else:
        freed += inventory.remote_bytes(rec.run_id)
        inventory.delete_remote_artifacts(rec.artifact_uri)
    cache = tracking.download_cache(rec.run_id)
    freed += tree_bytes(cache)
    shutil.rmtree(cache, ignore_errors=True)
    return freed


def _new_user(rec: RunRec, p: Plan) -> str | None:
    """A run the plan did not see that names `rec` as its upstream or chain stage (started since the
    listing: a chain reused `rec`, or `--from` named it), or None."""
    if not p.searched or rec.stage == "chain":
        return None
    for tag in (tracking.TAG_UPSTREAM, TAG_CHAIN_RUN):
        for rid in inventory.runs_naming(p.searched, f"{tag}{rec.stage}", rec.run_id):
            if rid not in p.known:
                return rid
    return None


def delete(p: Plan) -> tuple[int, int]:
    """Remove what the plan lists: (runs removed, bytes freed).

    Per run: its registry versions first (a version must never point at missing files), then the run is
    deleted in MLflow, then its artifacts. Deleting the run before its files means an interruption leaves
    at worst a deleted run with files still on disk, which the next gc finishes (TAG_GC), and never a
    visible FINISHED run without artifacts, which `fewscan run` would reuse and fail on."""
    freed, done = 0, 0
    for i, d in enumerate(p.doomed, 1):
        rid = d.run.run_id
        lifecycle_stage, status = inventory.run_state(rid)
        if lifecycle_stage != "active" or status == "RUNNING":
            log(f"gc: [{i}/{len(p.doomed)}] {d.run.stage} {rid}: changed since it was listed; left alone")
            continue
        user = _new_user(d.run, p)
        if user:
            log(f"gc: [{i}/{len(p.doomed)}] {d.run.stage} {rid}: run {user} started using it; left alone")
            continue
        refused = None
        for name, version in d.versions:  # a version must never point at missing files: these first
            refused = inventory.unregister(name, version)
            if refused is not None:
                break
        if refused is not None:
            log(
                f"gc: [{i}/{len(p.doomed)}] {d.run.stage} {rid}: could not unregister its model ({refused}); left alone"
            )
            continue
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        inventory.delete_run(rid, TAG_GC, f"artifacts removed by fewscan gc at {stamp}")
        n = _remove_artifacts(d.run)
        freed += n
        done += 1
        log(f"gc: [{i}/{len(p.doomed)}] removed {d.run.stage} run {rid} ({d.reason}): {human(n)}")
    for r in p.leftovers:
        n = _remove_artifacts(r)
        freed += n
        log(f"gc: finished removing deleted run {r.run_id}: {human(n)}")
    return done, freed
