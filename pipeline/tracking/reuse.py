"""Which run a stage can reuse, wait for, or resume instead of computing again: a FINISHED run with the
stage's fingerprint (`fewscan run`), the live runs computing it (pipeline/claims.py), the newest
interrupted run and the settings it started with (`--resume`, pipeline/resume.py). Searched only where
`search_scope` allows and, on a server, among the user's own runs (pipeline/tracking/owners.py)."""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.errors import UpstreamError
from pipeline.tracking import owners
from pipeline.tracking.artifacts import artifact_path
from pipeline.tracking.experiments import search_scope
from pipeline.tracking.leases import lease_gone
from pipeline.tracking.store import client, retry
from pipeline.tracking.tags import TAG_FINGERPRINT, TAG_HOST, TAG_STAGE, TAG_SUITE


def _with_fingerprint(
    stage: str, fp: str, status: str, suite: str | None, dataset: str | None, max_results: int, what: str
) -> list[Any]:
    """The runs of `stage` with fingerprint `fp` and `status`, newest first, in the suite's own experiments
    (`search_scope`) and, on a server, created by the current user: a fingerprint is only a hash of tags
    anyone can set."""
    c = client()
    exps = search_scope(stage, suite, dataset)
    if not exps:
        return []
    filt = owners.runs_filter(
        [
            f"tags.`{TAG_FINGERPRINT}` = '{fp}'",
            f"tags.`{TAG_STAGE}` = '{stage}'",
            f"attributes.status = '{status}'",
        ]
    )
    return list(
        retry(
            lambda: c.search_runs(
                exps, filt, order_by=["attributes.start_time DESC"], max_results=max_results
            ),
            what,
        )
    )


def find_reusable(stage: str, fp: str, *, suite: str | None, dataset: str | None) -> str | None:
    """The newest FINISHED run of `stage` with this fingerprint, in the scope `_with_fingerprint` allows."""
    runs = _with_fingerprint(stage, fp, "FINISHED", suite, dataset, 1, "search runs")
    return runs[0].info.run_id if runs else None


def running_with_fingerprint(stage: str, fp: str, *, suite: str | None, dataset: str | None) -> list[Any]:
    """The RUNNING runs of `stage` with this fingerprint whose process is alive (a lease that is not gone;
    a run without a lease, of an older fewscan, never counts), in the scope and of the owner
    `find_reusable` accepts: the runs computing what a reuse would find (pipeline/claims.py)."""
    runs = _with_fingerprint(stage, fp, "RUNNING", suite, dataset, 200, "search running runs")
    return [r for r in runs if TAG_HOST in r.data.tags and lease_gone(dict(r.data.tags)) is None]


def latest_unfinished(stage: str, suite: str) -> str | None:
    """The newest FAILED/KILLED/RUNNING run of `stage` in a suite (what `--resume` picks by default): in the
    suite's own experiment and, on a server, created by the current user (`search_scope`)."""
    c = client()
    exps = search_scope(stage, suite, None)
    if not exps:
        return None
    filt = owners.runs_filter(
        [
            f"tags.`{TAG_STAGE}` = '{stage}'",
            f"tags.`{TAG_SUITE}` = '{suite}'",
            "attributes.status != 'FINISHED'",
        ]
    )
    runs = retry(
        lambda: c.search_runs(exps, filt, order_by=["attributes.start_time DESC"], max_results=20), "search"
    )
    for run in runs:  # a RUNNING run whose process is alive is not "interrupted"
        tags = dict(run.data.tags)
        if run.info.status == "RUNNING" and TAG_HOST in tags and not lease_gone(tags):
            continue
        return str(run.info.run_id)
    return None


def started_with(run_id: str, stage: str) -> tuple[dict[str, str], dict[str, Any] | None]:
    """A run's tags and the config it logged when it started (`config/<stage>.yaml`, None if it has
    none): what `--resume` compares with the settings it is given (pipeline/resume.py)."""
    run = retry(lambda: client().get_run(run_id), "read the run to resume")
    try:
        path = artifact_path(run_id, run.info.artifact_uri, f"config/{stage}.yaml")
    except UpstreamError:
        return dict(run.data.tags), None
    return dict(run.data.tags), yaml.safe_load(path.read_text())
