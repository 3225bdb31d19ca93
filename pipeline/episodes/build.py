"""The episodes stage without MLflow: scan index + suite config -> split, fixed episodes, audit.

`stage.py` wraps this with the tracking glue; the benchmark and the tests call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import atomic
from pipeline.artifacts import SplitFile, write_artifact
from pipeline.episodes.audit import audit
from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.episode import Episode, write_episodes
from pipeline.episodes.labels import LabelTable
from pipeline.episodes.sampler import EpisodeSampler, fixed_episodes
from pipeline.episodes.split import build_split
from pipeline.errors import DataError


@dataclass
class Built:
    split: dict[str, Any]
    val: list[Episode]
    test: list[Episode]
    audit: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def normal_label_of(meta: dict[str, Any]) -> str:
    label = meta.get("normal_label")
    if not label:
        raise DataError(
            "store.json of the ingest run has no 'normal_label'; set the normal label in the data manifest "
            "and re-run ingest (binary episodes need it)"
        )
    return str(label)


def build_episodes(index: pd.DataFrame, meta: dict[str, Any], cfg: EpisodesConfig) -> Built:
    """Split, fixed val/test episodes and the leakage audit for one scan index (reads no image)."""
    table = LabelTable.from_index(index, normal_label_of(meta), meta.get("label_names"), cfg.group_by)
    split, warnings = build_split(table, cfg)
    # the samplers read the split as meta-train and evaluate will read split.json: through its model
    typed = SplitFile.model_validate(split)
    val: list[Episode] = []
    if cfg.val_episodes > 0:
        val = fixed_episodes(
            EpisodeSampler(typed, index, cfg, "val", table=table), cfg.val_episodes, cfg.seed
        )
    test = fixed_episodes(EpisodeSampler(typed, index, cfg, "test", table=table), cfg.test_episodes, cfg.seed)
    report = audit(split, {"val": val, "test": test}, index, cfg, table=table)
    return Built(split, val, test, report, warnings)


def write_outputs(built: Built, outdir: Path) -> dict[str, Path]:
    """split.json, episodes/val.jsonl, episodes/test.jsonl, leakage_audit.json under `outdir`."""
    paths = {
        "split": outdir / "split.json",
        "val": outdir / "episodes" / "val.jsonl",
        "test": outdir / "episodes" / "test.jsonl",
        "audit": outdir / "leakage_audit.json",
    }
    atomic.write_json(paths["audit"], built.audit)
    # split.json through its model (pipeline/artifacts.py): what is written is what the readers parse
    write_artifact(paths["split"], SplitFile.model_validate(built.split))
    write_episodes(paths["val"], built.val)
    write_episodes(paths["test"], built.test)
    return paths
