"""The episodes stage without MLflow: scan index + suite config -> split, fixed episodes, audit.

`stage.py` wraps this with the tracking glue; the benchmark and the tests call it directly.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

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
    val: list[Episode] = []
    if cfg.val_episodes > 0:
        val = fixed_episodes(
            EpisodeSampler(split, index, cfg, "val", table=table), cfg.val_episodes, cfg.seed
        )
    test = fixed_episodes(EpisodeSampler(split, index, cfg, "test", table=table), cfg.test_episodes, cfg.seed)
    report = audit(split, {"val": val, "test": test}, index, cfg, table=table)
    return Built(split, val, test, report, warnings)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            # json.dumps, not json.dump: dump always takes json's pure-Python encoder (1 s of CPU for
            # the split.json of a 112k-scan index); dumps uses the C one, for the same text
            f.write(json.dumps(obj) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(built: Built, outdir: Path) -> dict[str, Path]:
    """split.json, episodes/val.jsonl, episodes/test.jsonl, leakage_audit.json under `outdir`."""
    paths = {
        "split": outdir / "split.json",
        "val": outdir / "episodes" / "val.jsonl",
        "test": outdir / "episodes" / "test.jsonl",
        "audit": outdir / "leakage_audit.json",
    }
    write_json(paths["audit"], built.audit)
    write_json(paths["split"], built.split)
    write_episodes(paths["val"], built.val)
    write_episodes(paths["test"], built.test)
    return paths
