"""`fewscan run <suite>`: the whole chain as one parent MLflow run with a nested run per stage.

A stage whose fingerprint (config + upstream run ids + code version) matches a finished run is reused
and the reuse is printed; one that another live run is computing is waited for, then reused
(pipeline/claims.py). `force=True` recomputes everything and never waits. A failed stage leaves its run FAILED
(error in tag and `error.txt`), marks the parent FAILED, and stops the chain.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline import claims, stage_configs, stages, tracking, ui_view
from pipeline.errors import ConfigError
from pipeline.errors import StageFailed as StageFailed
from pipeline.progress import log
from pipeline.suite import Suite, dataset_name, load_suite
from pipeline.tracking import UpstreamRun


@dataclass
class ChainResult:
    parent_run_id: str
    outcomes: dict[str, stages.Outcome]
    experiment_id: str


def run_chain(
    suite_ref: str | Suite,
    overrides: list[str] | None = None,
    force: bool = False,
    wait_timeout_s: float | None = None,
) -> ChainResult:
    """Run the chain of a suite (a name or path; or a `Suite` the CLI has already loaded and validated with
    its overrides, which are then not applied again)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank would run ingest, episodes, ... and write the same runs
        raise ConfigError(
            "`fewscan run` is single-process. Under torchrun, run only the meta-train stage "
            "(`torchrun ... -m pipeline.cli meta-train SUITE`); a later `fewscan run SUITE` then reuses it."
        )
    if wait_timeout_s is not None and not wait_timeout_s >= 0:
        raise ConfigError(f"--wait-timeout {wait_timeout_s:g}: give a number of seconds >= 0")
    suite = suite_ref if isinstance(suite_ref, Suite) else load_suite(suite_ref, overrides)
    manifest_path = suite.manifest_path
    # Validate every config before starting anything: a typo in `evaluate` must not cost a meta-training.
    cfgs: dict[str, Any] = {}
    for stage in stage_configs.chain_stages(suite.cfg):  # the StageSpec table's order and links
        cfgs[stage] = suite.stage_config(stage)
    dataset = dataset_name(cfgs["ingest"], manifest_path)
    t0 = time.monotonic()
    outcomes: dict[str, stages.Outcome] = {}
    # The parent logs what the stages log, never the raw suite: its paths (the manifest's, adapt's
    # support/query sets, salt files) might name a patient and are logged only as the stages' salted hashes.
    public: dict[str, Any] = {"name": suite.name, "description": suite.cfg.description, "dataset": dataset}
    for stage, cfg in cfgs.items():
        public[stages.SECTIONS.get(stage, stage)] = stages.public_config(stage, cfg)
    with tracking.chain_run(suite.name, dataset, public) as parent:
        log(f"chain '{suite.name}' (parent run {parent.run_id}): {' -> '.join(cfgs)}")
        for stage, cfg in cfgs.items():
            upstream = {u: UpstreamRun.from_id(outcomes[u].run_id, u) for u in stages.UPSTREAM[stage]}
            try:
                oc = stages.execute_stage(
                    stage,
                    cfg,
                    upstream=upstream,
                    suite=suite.name,
                    dataset=dataset,
                    parent_run_id=parent.run_id,
                    reuse=not force,
                    wait_timeout_s=wait_timeout_s,
                )
            except (KeyboardInterrupt, claims.WaitTimeout):
                raise  # a wait that timed out left no run of this stage: nothing to point at
            except Exception as err:
                raise StageFailed(
                    f"stage '{stage}' failed: {type(err).__name__}: {err}\n"
                    f"The chain stopped. The {stage} run is marked FAILED with the error in its tag "
                    f"'fewscan.error' and artifact error.txt; open it with `fewscan ui`."
                ) from err
            outcomes[stage] = oc
            parent.set_tags(
                {f"fewscan.run.{stage}": oc.run_id, f"fewscan.reused.{stage}": str(oc.reused).lower()}
            )
        reused = [s for s, o in outcomes.items() if o.reused]
        ran = [s for s, o in outcomes.items() if not o.reused]
        summary = (
            f"chain '{suite.name}' finished in {time.monotonic() - t0:.1f} s: ran {len(ran)} stage(s)"
            f"{' (' + ', '.join(ran) + ')' if ran else ''}, reused {len(reused)}"
            f"{' (' + ', '.join(reused) + ')' if reused else ''}"
        )
        parent.set_description(  # with a link to each stage run (pipeline/ui_view.py)
            ui_view.chain_description(
                summary, parent.experiment_id, [(s, o.run_id, o.reused) for s, o in outcomes.items()]
            )
        )
        parent_id, exp_id = parent.run_id, parent.experiment_id
    print(f"{summary} | parent run {parent_id} | {tracking.run_url(exp_id, parent_id)}", flush=True)
    return ChainResult(parent_id, outcomes, exp_id)
