"""A stage run from start to end: created with its tags (stage, fingerprint, code, upstream links, owner,
lease) in the suite's own experiment, or reopened to resume, or taken over from a won claim
(pipeline/claims.py); its outputs uploaded and aliases moved when it FINISHES; FAILED or KILLED with the
error recorded otherwise. The parent run of `fewscan run` (`chain_run`) follows the same pattern."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__, atomic, ui_view
from pipeline.errors import UpstreamError
from pipeline.progress import log
from pipeline.tracking import owners, registry
from pipeline.tracking.experiments import experiment_id, experiment_name, present_experiment
from pipeline.tracking.fingerprints import code_version
from pipeline.tracking.leases import Heartbeat, lease_gone, lease_tags
from pipeline.tracking.runs import StageRun
from pipeline.tracking.store import client, retry, tracking_uri
from pipeline.tracking.tags import (
    TAG_CHAIN,
    TAG_CODE,
    TAG_DATASET,
    TAG_ERROR,
    TAG_FINGERPRINT,
    TAG_HEARTBEAT,
    TAG_HOST,
    TAG_PARENT,
    TAG_PID,
    TAG_STAGE,
    TAG_SUITE,
    TAG_UPSTREAM,
    TAG_USER,
    TAG_VERSION,
)
from pipeline.tracking.upstream import UpstreamRun


def stage_tags(
    stage: str,
    *,
    fp: str,
    upstream: dict[str, UpstreamRun],
    suite: str | None,
    dataset: str | None,
    parent_run_id: str | None,
) -> dict[str, str]:
    """The tags a new stage run is created with: stage, fingerprint, code, suite, upstream links, parent,
    user (on a server) and the lease."""
    tags: dict[str, str] = {
        TAG_STAGE: stage,
        TAG_FINGERPRINT: fp,
        TAG_CODE: code_version(stage),
        TAG_VERSION: __version__,
    }
    if suite:
        tags[TAG_SUITE] = suite
    if dataset:
        tags[TAG_DATASET] = dataset
    for name, up in upstream.items():
        tags[TAG_UPSTREAM + name] = up.run_id
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    user = owners.server_user()
    if user:
        tags[TAG_USER] = user  # the run's user_id, which the searches filter on
    tags.update(lease_tags())
    return tags


def create_stage_run(tags: dict[str, str], run_name: str, suite: str | None, dataset: str | None) -> Any:
    """Create a RUNNING run with `tags` in the suite's own experiment (created if missing)."""
    c = client()
    exp_id = experiment_id(experiment_name(suite, dataset))
    return retry(lambda: c.create_run(exp_id, tags=tags, run_name=run_name), "create a run")


def set_run_tag(run_id: str, key: str, value: str) -> None:
    retry(lambda: client().set_tag(run_id, key, value), "set a tag")


def withdraw_run(run_id: str, reason: str) -> None:
    """End a run that computed nothing (a claim that lost, pipeline/claims.py): KILLED with `reason` in
    `fewscan.error`, then deleted, so that neither `fewscan status` nor the UI shows it as a stage's run
    (`mlflow gc` removes it for good)."""
    c = client()
    retry(lambda: c.set_tag(run_id, TAG_ERROR, reason[:4900]), "withdraw a run")
    retry(lambda: c.set_terminated(run_id, "KILLED"), "withdraw a run")
    retry(lambda: c.delete_run(run_id), "withdraw a run")


def _start_system_metrics(run_id: str) -> Any:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(
            run_id, sampling_interval=10, samples_before_logging=1, tracking_uri=tracking_uri()
        )
        mon.start()
        return mon
    except Exception as err:  # noqa: BLE001 - system metrics are a nicety, never a reason to fail
        log(f"system metrics unavailable ({err}); continuing without them")
        return None


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    run_name: str,
    config: dict[str, Any],
    upstream: dict[str, UpstreamRun],
    fp: str,
    suite: str | None,
    dataset: str | None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    claimed_run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[StageRun]:
    """Open a stage run (or reattach to one to resume), yield it, and close it FINISHED/FAILED/KILLED.
    `claimed_run_id`: the run `claims.acquire` created (with `stage_tags`) and won, opened as a new run.

    On success everything under `run.outdir` is uploaded. On failure the error goes into the tag
    `fewscan.error` and the artifact `error.txt`, the run is marked FAILED, and the exception propagates.
    """
    c = client()
    tags = stage_tags(
        stage, fp=fp, upstream=upstream, suite=suite, dataset=dataset, parent_run_id=parent_run_id
    )

    if resume_run_id:
        run = retry(lambda: c.get_run(resume_run_id), "read the run to resume")
        if run.data.tags.get(TAG_STAGE) != stage:
            raise UpstreamError(f"run {resume_run_id} is not a {stage} run; cannot resume it as one")
        if run.info.status == "FINISHED":
            raise UpstreamError(f"{stage} run {resume_run_id} already FINISHED; nothing to resume")
        if run.info.status == "RUNNING" and TAG_HOST in run.data.tags and not lease_gone(run.data.tags):
            t = run.data.tags
            raise UpstreamError(
                f"{stage} run {resume_run_id} is still RUNNING (pid {t.get(TAG_PID)} on {t.get(TAG_HOST)}); "
                "wait for it or stop it before resuming"
            )
        # the lease first: a reopened run must never look RUNNING under its dead previous owner
        for k, v in lease_tags().items():
            retry(partial(c.set_tag, resume_run_id, k, v), "take the run's lease")
        retry(lambda: c.update_run(resume_run_id, status="RUNNING"), "reopen the run")
        run_id, resumed = resume_run_id, True
        artifact_uri = run.info.artifact_uri
    elif claimed_run_id:
        # created with these tags by the claim (pipeline/claims.py); its heartbeat restarts now
        run = retry(lambda: c.get_run(claimed_run_id), "read the claimed run")
        retry(partial(c.set_tag, claimed_run_id, TAG_HEARTBEAT, str(int(time.time()))), "take the lease")
        run_id, resumed = claimed_run_id, False
        artifact_uri = run.info.artifact_uri
    else:
        # a resume writes only into the run it was given; a new run goes into the suite's own experiment
        run = create_stage_run(tags, run_name, suite, dataset)
        run_id, resumed = run.info.run_id, False
        artifact_uri = run.info.artifact_uri

    outdir = Path(tempfile.mkdtemp(prefix=f"fewscan-{stage}-"))
    sr = StageRun(run_id, stage, run.info.experiment_id, outdir, artifact_uri, resumed, suite)
    monitor = _start_system_metrics(run_id) if system_metrics else None
    heartbeat = Heartbeat(run_id)
    try:
        if not resumed:
            sr.log_params(config)
            cfg_dir = Path(tempfile.mkdtemp(prefix="fewscan-cfg-"))
            atomic.write_text(cfg_dir / f"{stage}.yaml", yaml.safe_dump(config, sort_keys=False))
            sr.log_artifact(cfg_dir / f"{stage}.yaml", "config")
            shutil.rmtree(cfg_dir, ignore_errors=True)
        yield sr
        if any(outdir.iterdir()):
            sr.log_artifact(outdir, None)
        retry(lambda: c.set_terminated(run_id, "FINISHED"), "finish the run")
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        for name, alias, version in sr.pending_aliases:
            log(
                f"{stage} run {status}: {name} version {version} stays registered; {name}@{alias} did not move"
            )
        msg = f"{type(err).__name__}: {err}"
        with contextlib.suppress(Exception):
            errfile = outdir / "error.txt"
            atomic.write_text(errfile, msg + "\n\n" + traceback.format_exc())
            sr.log_artifact(errfile, None)
            sr.set_tags({TAG_ERROR: msg[:4900]})
        with contextlib.suppress(Exception):
            retry(lambda: c.set_terminated(run_id, status), "mark the run " + status)
        raise
    finally:
        heartbeat.stop()
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        shutil.rmtree(outdir, ignore_errors=True)
    registry.move_aliases(stage, run_id, sr.pending_aliases)  # only now that the run is FINISHED


@contextlib.contextmanager
def chain_run(suite: str, dataset: str | None, config: dict[str, Any]) -> Iterator[StageRun]:
    """The parent run of `fewscan run`: stage runs nest under it; reused ones are linked by tag."""
    c = client()
    exp_id = experiment_id(experiment_name(suite, dataset))
    present_experiment(
        exp_id, ui_view.experiment_description(suite, config.get("description", ""), dataset, exp_id)
    )
    tags = {TAG_CHAIN: "true", TAG_SUITE: suite, TAG_VERSION: __version__, **lease_tags()}
    if dataset:
        tags[TAG_DATASET] = dataset
    user = owners.server_user()
    if user:
        tags[TAG_USER] = user
    run = retry(lambda: c.create_run(exp_id, tags=tags, run_name=f"chain {suite}"), "create the chain run")
    sr = StageRun(
        run.info.run_id, "chain", exp_id, Path(tempfile.mkdtemp(prefix="fewscan-chain-")), "", False
    )
    sr.artifact_uri = run.info.artifact_uri
    heartbeat = Heartbeat(sr.run_id)
    try:
        sr.log_params(config)
        yield sr
        retry(lambda: c.set_terminated(sr.run_id, "FINISHED"), "finish the chain run")
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            sr.set_tags({TAG_ERROR: f"{type(err).__name__}: {err}"[:4900]})
            retry(lambda: c.set_terminated(sr.run_id, status), "mark the chain run " + status)
        raise
    finally:
        heartbeat.stop()
        shutil.rmtree(sr.outdir, ignore_errors=True)


def run_status(run_id: str) -> str:
    return str(retry(lambda: client().get_run(run_id), "read a run").info.status)
