"""`fewscan status [SUITE]`: each stage's latest run, its state, and whether `fewscan run` would reuse it.

Opening the store first marks runs whose process is gone KILLED (tracking.reap_dead_runs), so a stage
shown RUNNING is really running. "Reusable" is the chain's own test (stages.stage_fingerprint +
tracking.find_reusable): a FINISHED run with the fingerprint the suite's current config, upstream runs
and code give, or a live run computing it, which `fewscan run` waits for; a stage below one that would
rerun cannot be reused (its upstream run would be new).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline import stages, tracking


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _latest(c: Any, exp_ids: list[str], filt: list[str]) -> Any:
    if not exp_ids:
        return None
    runs = tracking.retry(
        lambda: c.search_runs(
            exp_ids, tracking.runs_filter(filt), order_by=["attributes.start_time DESC"], max_results=1
        ),
        "search runs",
    )
    return runs[0] if runs else None


def status_lines(suite_ref: str | None) -> list[str]:
    c = tracking.client()  # marks dead runs KILLED
    if suite_ref is None:
        return _all_suites(c)
    from pipeline.stage_configs import chain_stages, spec
    from pipeline.suite import dataset_name, load_suite

    suite = load_suite(suite_ref)
    cfgs = {s: suite.stage_config(s) for s in chain_stages(suite.cfg)}
    dataset = dataset_name(cfgs["ingest"], suite.manifest_path)
    lines = [f"suite '{suite.name}' (dataset '{dataset}') in {tracking.tracking_uri()}"]
    rows: list[tuple[str, ...]] = [("stage", "latest run", "state", "started", "reusable by `fewscan run`")]
    reused: dict[str, str] = {}
    for stage, cfg in cfgs.items():
        which = (
            (tracking.TAG_DATASET, dataset) if spec(stage).per_dataset else (tracking.TAG_SUITE, suite.name)
        )
        filt = [f"tags.`{tracking.TAG_STAGE}` = '{stage}'", f"tags.`{which[0]}` = '{which[1]}'"]
        scope = tracking.search_scope(stage, suite.name, dataset)
        run = _latest(c, scope, filt)
        ups = stages.UPSTREAM[stage]
        if all(u in reused for u in ups):
            fp = stages.stage_fingerprint(stage, cfg, {u: reused[u] for u in ups})
            rid = tracking.find_reusable(stage, fp, suite=suite.name, dataset=dataset)
            if rid:
                reused[stage] = rid
                verdict = "yes" if run is not None and rid == run.info.run_id else f"yes: run {rid}"
            elif live := tracking.running_with_fingerprint(stage, fp, suite=suite.name, dataset=dataset):
                # another chain is computing it: `fewscan run` waits for that run (pipeline/claims.py)
                verdict = f"when run {live[0].info.run_id} finishes (running now; `fewscan run` waits for it)"
            else:
                verdict = "no: config, upstream or code changed" if run is not None else "no: never run"
        else:
            verdict = "no: an upstream stage would rerun"
        if run is None:
            rows.append((stage, "-", "-", "-", verdict))
        else:
            state = str(run.info.status)
            rows.append((stage, str(run.info.run_id), state, _when(run.info.start_time), verdict))
    return lines + _table(rows)


def _all_suites(c: Any) -> list[str]:
    exps = tracking.retry(
        lambda: c.search_experiments(filter_string="name LIKE 'fewscan/%'", max_results=1000),
        "list the experiments",
    )
    if not exps:
        return [f"no fewscan runs in {tracking.tracking_uri()}"]
    lines = [
        f"fewscan experiments in {tracking.tracking_uri()} (`fewscan status SUITE` also says what is reusable)"
    ]
    rows: list[tuple[str, ...]] = [("experiment", "stage", "latest run", "state", "started")]
    for exp in sorted(exps, key=lambda e: e.name):
        for stage in stages.ORDER:
            run = _latest(c, [str(exp.experiment_id)], [f"tags.`{tracking.TAG_STAGE}` = '{stage}'"])
            if run is not None:
                rows.append(
                    (exp.name, stage, str(run.info.run_id), str(run.info.status), _when(run.info.start_time))
                )
    return lines + _table(rows)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
