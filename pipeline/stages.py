"""The stage registry and the one function that runs a stage as an MLflow run.

Stage packages stay thin and uniform (see docs/CONTRACTS.md): `CONFIG`, `UPSTREAM`, `run_name`,
`execute`, and optionally `add_arguments` / `overrides_from_args` / `fingerprint_inputs`. Both the
single-stage commands and `fewscan run` go through `execute_stage`, so tagging, reuse, summaries and
failure handling behave the same everywhere.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pipeline import claims, distributed, tracking
from pipeline.progress import log
from pipeline.stage_configs import ORDER as ORDER
from pipeline.stage_configs import PACKAGES
from pipeline.stage_configs import SECTIONS as SECTIONS
from pipeline.stage_configs import UPSTREAM as UPSTREAM
from pipeline.tracking import StageResult, UpstreamRun

# The stage order, upstreams and suite sections are in stage_configs.py, which the CLI reads without
# importing torch or mlflow; the module of each stage is `<package>.stage`.
MODULES = {stage: f"{package}.stage" for stage, package in PACKAGES.items()}
# Stages whose runs benefit from MLflow system metrics (CPU, memory, GPU) in the UI.
SYSTEM_METRICS = {"meta-train", "evaluate"}


def module(stage: str) -> ModuleType:
    return importlib.import_module(MODULES[stage])


def public_config(stage: str, cfg: Any) -> dict[str, Any]:
    """The stage's config as it may be logged to MLflow: through the stage's `public_config` when it has
    one (paths that might name a patient become salted hashes, docs/ARCHITECTURE.md principle 10), else as
    it is."""
    mod = module(stage)
    if hasattr(mod, "public_config"):
        return dict(mod.public_config(cfg))
    return dict(cfg.model_dump(mode="json"))


def stage_fingerprint(stage: str, cfg: Any, upstream_ids: dict[str, str]) -> str:
    """The fingerprint a run of `stage` with this config on these upstream runs gets (what reuse matches)."""
    mod = module(stage)
    fp_cfg = cfg.model_dump(mode="json")
    for key in getattr(mod, "FINGERPRINT_EXCLUDE", ()):
        fp_cfg.pop(key, None)
    inputs = mod.fingerprint_inputs(cfg) if hasattr(mod, "fingerprint_inputs") else None
    # The device setting picks the numerics that enter the fingerprint (torch, device type, CPU kernels).
    device = getattr(cfg, "device", "auto")
    return tracking.fingerprint(stage, fp_cfg, upstream_ids, inputs, device=device)


@dataclass
class Outcome:
    stage: str
    run_id: str
    reused: bool
    summary: str = ""


def execute_stage(
    stage: str,
    cfg: Any,
    *,
    upstream: dict[str, UpstreamRun],
    suite: str | None,
    dataset: str | None,
    parent_run_id: str | None = None,
    reuse: bool = False,
    resume_run_id: str | None = None,
    wait_timeout_s: float | None = None,
) -> Outcome:
    """Run one stage as an MLflow run (or, with `reuse`, reuse a finished one with the same fingerprint,
    after waiting up to `wait_timeout_s` (None: while it lives) for a live run computing it)."""
    mod = module(stage)
    if stage == "meta-train":
        # torchrun's ranks, or one process
        dctx = distributed.init_from_env(device=getattr(cfg, "device", "auto"))
        if not dctx.is_main:
            # ranks > 0 train alongside rank 0 but never talk to MLflow: rank 0 owns the run
            with distributed.FollowerRun(stage, dctx.rank) as follower_run:
                follower: StageResult = mod.execute(cfg, follower_run, upstream)
            return Outcome(stage, "", False, follower.summary)
    # What is logged (params + config YAML) may differ from what is hashed: a stage can hide paths that
    # might name a patient (`public_config`) and leave out knobs that do not change its result
    # (`FINGERPRINT_EXCLUDE`, e.g. the number of worker processes).
    cfg_dict = public_config(stage, cfg)
    device = getattr(cfg, "device", "auto")
    fp = stage_fingerprint(stage, cfg, {k: u.run_id for k, u in upstream.items()})
    if resume_run_id:  # a resumed run keeps the params and fingerprint it started with: same work only
        from pipeline.resume import check_unchanged

        check_unchanged(
            stage,
            resume_run_id,
            config=cfg_dict,
            fp=fp,
            upstream_ids={k: u.run_id for k, u in upstream.items()},
            device=device,
            exclude=getattr(mod, "FINGERPRINT_EXCLUDE", ()),
        )
    name = mod.run_name(cfg)
    claimed: str | None = None
    if reuse and not resume_run_id:
        # reuse a finished run, or wait for a live one computing the same (pipeline/claims.py)
        def create_claim() -> str:
            # the tags (and the lease's heartbeat) as of now, after any wait
            tags = tracking.stage_tags(
                stage, fp=fp, upstream=upstream, suite=suite, dataset=dataset, parent_run_id=parent_run_id
            )
            tags[claims.TAG_CLAIM] = claims.CHOOSING
            return str(tracking.create_stage_run(tags, name, suite, dataset).info.run_id)

        claim = claims.acquire(
            stage, fp, suite=suite, dataset=dataset, create=create_claim, timeout_s=wait_timeout_s
        )
        if claim.reuse_id:
            how = (
                f"computed meanwhile by another chain: waited {claim.waited_s:.0f} s for run {claim.waited_for}"
                if claim.waited_for
                else "same config, upstream runs and code"
            )
            print(f"{stage}: reusing finished run {claim.reuse_id} ({how})", flush=True)
            return Outcome(stage, claim.reuse_id, True)
        claimed = claim.run_id
    log(f"{stage}: starting run '{name}'" + (f" (resuming {resume_run_id})" if resume_run_id else ""))
    t0 = time.monotonic()
    with tracking.stage_run(
        stage,
        run_name=name,
        config=cfg_dict,
        upstream=upstream,
        fp=fp,
        suite=suite,
        dataset=dataset,
        parent_run_id=parent_run_id,
        resume_run_id=resume_run_id,
        claimed_run_id=claimed,
        system_metrics=stage in SYSTEM_METRICS,
    ) as run:
        numerics = tracking.numerics(stage, device)
        if numerics:
            run.set_tags({tracking.TAG_NUMERICS: json.dumps(numerics, sort_keys=True)})
        result: StageResult = mod.execute(cfg, run, upstream)
        elapsed = time.monotonic() - t0
        line = f"{stage} finished in {elapsed:.1f} s: {result.summary}"
        run.describe(line, upstream)  # summary, links to the upstream runs, evaluate's report
        metrics = {k: float(v) for k, v in (result.metrics or {}).items()}
        metrics["stage_seconds"] = elapsed
        run.log_metrics(metrics)
        run.publish_view()  # its key metrics become columns of the experiment's run table
        run_id, url = run.run_id, run.ui_url
    print(f"{line} | run {run_id} | {url}", flush=True)
    return Outcome(stage, run_id, False, result.summary)
