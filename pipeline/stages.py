"""The stage registry and the one function that runs a stage as an MLflow run.

Which stages there are, their order, links and per-stage behaviours are in the StageSpec table
(pipeline/stage_configs.py). Stage modules stay thin and uniform: the `StageModule` protocol
(pipeline/protocols.py; docs/CONTRACTS.md), handed a `RunLike`. Both the single-stage commands and
`fewscan run` go through `execute_stage`, so tagging, reuse, summaries and failure handling behave the same
everywhere.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pipeline import claims, distributed, tracking
from pipeline.progress import log
from pipeline.protocols import StageModule
from pipeline.stage_configs import ORDER as ORDER
from pipeline.stage_configs import SECTIONS as SECTIONS
from pipeline.stage_configs import SPECS, spec
from pipeline.stage_configs import UPSTREAM as UPSTREAM
from pipeline.tracking import StageResult, UpstreamRun

# The module of each stage (StageSpec.entry_module): what runs it and where its code set starts
# (pipeline/codeset.py, through tracking.code_files).
MODULES = {s.name: s.entry_module for s in SPECS}

if TYPE_CHECKING:
    # mypy checks every stage module against the protocol (tests/foundation/test_stage_registry.py checks
    # that each StageSpec's module is listed here).
    from pipeline.adapt import stage as _adapt
    from pipeline.episodes import stage as _episodes
    from pipeline.evaluate import stage as _evaluate
    from pipeline.ingest import stage as _ingest
    from pipeline.metatrain import stage as _metatrain

    _checked: StageModule = _ingest
    _checked = _episodes
    _checked = _metatrain
    _checked = _adapt
    _checked = _evaluate


def module(stage: str) -> StageModule:
    return cast(StageModule, importlib.import_module(MODULES[stage]))


def public_config(stage: str, cfg: Any) -> dict[str, Any]:
    """The stage's config as it may be logged to MLflow: through the stage's `public_config` when it has
    one (paths that might name a patient become salted hashes, docs/ARCHITECTURE.md principle 10), else as
    it is."""
    hook = getattr(module(stage), "public_config", None)
    if hook is not None:
        return dict(hook(cfg))
    return dict(cfg.model_dump(mode="json"))


def stage_fingerprint(stage: str, cfg: Any, upstream_ids: dict[str, str]) -> str:
    """The fingerprint a run of `stage` with this config on these upstream runs gets (what reuse matches)."""
    mod = module(stage)
    fp_cfg = cfg.model_dump(mode="json")
    for key in getattr(mod, "FINGERPRINT_EXCLUDE", ()):
        fp_cfg.pop(key, None)
    hook = getattr(mod, "fingerprint_inputs", None)
    inputs = hook(cfg) if hook is not None else None
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
    if spec(stage).distributed:
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
        system_metrics=spec(stage).system_metrics,
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
