"""The finished runs a stage consumes: one named by id (`--from`), or the latest of the suite; and the
lineage of a run back to ingest, through the `fewscan.upstream.<stage>` tags (docs/ARCHITECTURE.md, "Five
stages, each an MLflow run")."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from pipeline import stage_configs, ui_view
from pipeline.errors import UpstreamError
from pipeline.tracking import owners
from pipeline.tracking.artifacts import artifact_path
from pipeline.tracking.experiments import search_scope
from pipeline.tracking.store import client, http_status, retry, tracking_uri
from pipeline.tracking.tags import TAG_DATASET, TAG_STAGE, TAG_SUITE, TAG_UPSTREAM


@dataclass
class UpstreamRun:
    """A finished run that a stage consumes."""

    run_id: str
    stage: str
    params: dict[str, str]
    tags: dict[str, str]
    artifact_uri: str
    experiment_id: str = ""

    @classmethod
    def from_id(cls, run_id: str, expect_stage: str | None = None) -> UpstreamRun:
        c = client()
        try:
            run = retry(lambda: c.get_run(run_id), f"read run {run_id}")
        except MlflowException as err:
            if http_status(err) == 403:  # basic auth: the run exists, its experiment is not shared with you
                who = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
                raise UpstreamError(
                    f"user '{who}' has no permission to read run '{run_id}' on {tracking_uri()} (HTTP 403). "
                    "Ask the owner of its experiment to grant you READ on it (docs/scaling.md, 'For a lab'), "
                    "or use a run of your own."
                ) from None
            raise UpstreamError(
                f"no MLflow run with id '{run_id}' in {tracking_uri()}. Check the id in the MLflow UI "
                "(`fewscan ui`) or set MLFLOW_TRACKING_URI to the store that holds it."
            ) from None
        stage = run.data.tags.get(TAG_STAGE, "")
        if expect_stage and stage != expect_stage:
            raise UpstreamError(
                f"run {run_id} is a '{stage or 'non-fewscan'}' run, but a '{expect_stage}' run is needed here"
            )
        if run.info.status != "FINISHED":
            raise UpstreamError(
                f"{stage} run {run_id} is {run.info.status}, not FINISHED; rerun that stage (or resume it) first"
            )
        return cls(
            run_id=run_id,
            stage=stage,
            params=dict(run.data.params),
            tags=dict(run.data.tags),
            artifact_uri=run.info.artifact_uri,
            experiment_id=run.info.experiment_id,
        )

    def artifact(self, rel: str) -> Path:
        """Local path of one of the run's artifacts (a file or a folder)."""
        return artifact_path(self.run_id, self.artifact_uri, rel)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.artifact(rel).read_text())

    def upstream(self, stage: str) -> UpstreamRun:
        rid = self.tags.get(TAG_UPSTREAM + stage)
        if not rid:
            raise UpstreamError(f"{self.stage} run {self.run_id} records no upstream '{stage}' run")
        return UpstreamRun.from_id(rid, expect_stage=stage)


def latest_run(stage: str, *, suite: str | None = None, dataset: str | None = None) -> UpstreamRun:
    """The most recent FINISHED run of `stage` for a suite (or, for ingest, a dataset), in the suite's
    own experiments only (`search_scope`; for ingest, `suite` only widens the scope to the suite's
    experiment) and, on a server, among the current user's runs only."""
    c = client()
    filt = [f"tags.`{TAG_STAGE}` = '{stage}'", "attributes.status = 'FINISHED'"]
    per_dataset = stage in stage_configs.BY_NAME and stage_configs.spec(stage).per_dataset
    if suite and not per_dataset:
        filt.append(f"tags.`{TAG_SUITE}` = '{suite}'")
    if dataset:
        filt.append(f"tags.`{TAG_DATASET}` = '{dataset}'")
    exps = search_scope(stage, suite, dataset)
    runs = (
        retry(
            lambda: c.search_runs(
                exps, owners.runs_filter(filt), order_by=["attributes.start_time DESC"], max_results=1
            ),
            f"search {stage} runs",
        )
        if exps
        else []
    )
    if not runs:
        which = f"suite '{suite}'" if suite and not per_dataset else f"dataset '{dataset}'"
        raise UpstreamError(
            f"no finished '{stage}' run for {which} in {tracking_uri()}. Run `fewscan {stage} ...` first, "
            "or pass --from RUN_ID."
        )
    return UpstreamRun.from_id(runs[0].info.run_id, expect_stage=stage)


def resolve_upstream(
    stage: str, run_id: str | None, *, suite: str | None, dataset: str | None
) -> UpstreamRun:
    if run_id:  # named explicitly: used wherever it lives
        return UpstreamRun.from_id(run_id, expect_stage=stage)
    return latest_run(stage, suite=suite, dataset=dataset if stage_configs.spec(stage).per_dataset else None)


def lineage(upstream: dict[str, UpstreamRun]) -> list[ui_view.Link]:
    """The upstream runs of a stage and theirs, back to ingest, nearest first (each stage once)."""
    out: list[ui_view.Link] = []
    todo = list(upstream.values())
    seen: set[str] = set()
    while todo:
        up = todo.pop(0)
        if up.run_id in seen:
            continue
        seen.add(up.run_id)
        out.append(ui_view.Link(up.stage, up.tags.get("mlflow.runName", ""), up.experiment_id, up.run_id))
        for key, rid in sorted(up.tags.items()):
            if key.startswith(TAG_UPSTREAM) and rid not in seen:
                with contextlib.suppress(UpstreamError):  # a deleted upstream run: the link is left out
                    todo.append(UpstreamRun.from_id(rid, expect_stage=key[len(TAG_UPSTREAM) :]))
    return out
