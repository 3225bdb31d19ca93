"""`fewscan episodes`: an ingest run + the suite's `episodes:` section -> split.json, fixed episodes,
leakage_audit.json (artifacts of an MLflow run tagged fewscan.stage=episodes). Reads no image: only
`store/scan_index.parquet` and `store/store.json` of the ingest run are fetched, so a remote artifact
store never downloads the image array for this stage.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd

from pipeline.episodes.audit import LeakageError
from pipeline.episodes.build import build_episodes, write_outputs
from pipeline.episodes.config import EpisodesConfig

# the command-line hooks live in options.py (no torch: the CLI validates before importing it)
from pipeline.episodes.options import add_arguments as add_arguments
from pipeline.episodes.options import compose_section as compose_section
from pipeline.episodes.options import overrides_from_args as overrides_from_args
from pipeline.names import key_parts, metric_key
from pipeline.progress import log
from pipeline.protocols import RunLike
from pipeline.tracking import StageResult, UpstreamRun

CONFIG = EpisodesConfig


def _kinds_label(cfg: EpisodesConfig) -> str:
    return "+".join("binary" if k == "binary" else f"{cfg.n_way}way" for k in cfg.kinds)


def run_name(cfg: EpisodesConfig) -> str:
    """e.g. "episodes binary+3way k=1,5 q=15"."""
    return f"episodes {_kinds_label(cfg)} k={','.join(map(str, cfg.k_shots))} q={cfg.q_query}"


def split_metrics(
    split: dict[str, Any], n_val: int, n_test: int, label_names: list[str] | None = None
) -> tuple[dict[str, str], dict[str, float]]:
    """Params (each condition's split) and metrics (image / patient counts) that make runs comparable.

    Condition names enter keys through pipeline/names.py, mapped over the store's `label_names` (the set
    ingest mapped), so a condition has the same key part in the ingest and the episodes run."""
    params: dict[str, str] = {}
    metrics: dict[str, float] = {}
    parts = key_parts([*(label_names or []), *split["conditions"]])
    for w in parts.collisions:
        log(f"episodes: WARNING: {w}")
    for name, info in split["conditions"].items():
        c = parts[name]
        params[metric_key("condition", c)] = info["split"]
        metrics[metric_key("images", c)] = info["images"]
        metrics[metric_key("patients", c)] = info["patients"]
        if "pool_patients" in info:
            metrics[metric_key("pool_images", c)] = info["pool_images"]
            metrics[metric_key("pool_patients", c)] = info["pool_patients"]
            metrics[metric_key("eligible_patients", c)] = info["eligible_patients"]
    for pool, n in split["pool_patients"].items():
        metrics[metric_key("pool_patients", pool)] = n
        metrics[metric_key("pool_images", pool)] = split["pool_images"][pool]
        metrics[metric_key("normal_patients", pool)] = split["normal"][pool]["patients"]
    for s in ("train", "val", "test", "dropped"):
        metrics[metric_key("conditions", s)] = sum(1 for i in split["conditions"].values() if i["split"] == s)
    metrics["episodes.val"] = n_val
    metrics["episodes.test"] = n_test
    return params, metrics


_CONTEXT = {"train": "training", "val": "validation", "test": "testing"}


def pool_tables(split: dict[str, Any], index: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, str]]:
    """Per pool, the scans its lists name (scan_key, patient_key, labels, pool; salted keys only, no
    PHI) and a content digest, for MLflow dataset inputs (training / validation / testing)."""
    out: dict[str, tuple[pd.DataFrame, str]] = {}
    cols = [c for c in ("scan_key", "patient_key", "labels") if c in index.columns]
    # isin on Python strings: five times faster than on pandas' Arrow-backed strings for a 112k index
    scan_keys = index["scan_key"].astype(object)
    for pool, lists in split["pools"].items():
        keys = sorted({k for lst in lists.values() for k in lst})
        df = index.loc[scan_keys.isin(keys), cols].sort_values("scan_key").reset_index(drop=True)
        df["pool"] = pool
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        out[pool] = (df, digest)
    return out


def execute(cfg: EpisodesConfig, run: RunLike, upstream: dict[str, UpstreamRun]) -> StageResult:
    up = upstream["ingest"]
    meta = up.read_json("store/store.json")
    index = pd.read_parquet(up.artifact("store/scan_index.parquet"))
    log(f"episodes: scan index of ingest run {up.run_id}: {len(index)} scans")

    built = build_episodes(index, meta, cfg)
    for w in built.warnings:
        log(f"WARNING: {w}")
    paths = write_outputs(built, run.outdir)

    failed = [c for c in built.audit["checks"] if not c["passed"]]
    params, metrics = split_metrics(
        built.split, len(built.val), len(built.test), list(meta.get("label_names") or [])
    )
    params["normal_label"] = built.split["normal_label"]
    metrics["leakage_checks_failed"] = len(failed)
    run.log_params(params)
    run.log_metrics(metrics)
    for pool, (df, digest) in pool_tables(built.split, index).items():
        run.log_dataset(df, name=f"split-{pool}", digest=digest, context=_CONTEXT[pool], source="split.json")
    if failed:
        # Upload the audit now: a failing stage uploads nothing else, and this file is the evidence.
        run.log_artifact(paths["audit"])
        raise LeakageError(
            f"leakage audit failed ({len(failed)} of {len(built.audit['checks'])} checks): "
            + "; ".join(f"{c['name']}: {c['detail']}" for c in failed)
            + ". See leakage_audit.json of this run; this is a bug in the split or sampler, please report it"
        )

    conds = built.split["conditions"]
    by = {
        s: sorted(n for n, i in conds.items() if i["split"] == s) for s in ("train", "val", "test", "dropped")
    }
    summary = (
        f"{len(by['train'])} common / {len(by['val'])} validation / {len(by['test'])} rare conditions"
        + (f" ({len(by['dropped'])} dropped)" if by["dropped"] else "")
        + f"; patients train/val/test {built.split['pool_patients']['train']}/"
        f"{built.split['pool_patients']['val']}/{built.split['pool_patients']['test']}; "
        f"{len(built.val)} val + {len(built.test)} test episodes ({_kinds_label(cfg)}, k={cfg.k_shots}, "
        f"q={cfg.q_query}); leakage audit passed ({len(built.audit['checks'])} checks)"
    )
    headline = {
        "conditions.test": metrics["conditions.test"],
        "episodes.test": float(len(built.test)),
        "leakage_checks_failed": 0.0,
    }
    return StageResult(summary=summary, metrics=headline)
