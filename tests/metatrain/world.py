"""A tiny synthetic few-shot world for the meta-train tests: an image store and a real split + fixed
validation episodes made by the episodes library (`build_episodes`), written as the upstream stages do.

Every condition has its own fixed spatial pattern added to noise (normal scans: none), so the tasks are
learnable from a few examples. One scan per patient; keys are synthetic hex strings (no patient data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.episodes.build import build_episodes, write_outputs
from pipeline.episodes.config import EpisodesConfig

NORMAL = "No Finding"
TRAIN = ["Alpha", "Beta", "Gamma"]
VAL = ["Delta", "Epsilon"]
TEST = ["Zeta", "Eta"]


def episodes_cfg(**over: Any) -> EpisodesConfig:
    base: dict[str, Any] = {
        "split": {"common": TRAIN, "validation": VAL, "rare": TEST},
        "kinds": ["binary", "n_way"],
        "n_way": 2,
        "k_shot": [1, 2],
        "q_query": 3,
        "val_episodes": 3,
        "test_episodes": 3,
        "seed": 0,
        "normal_fraction": {"train": 0.6, "val": 0.2, "test": 0.2},
    }
    base.update(over)
    return EpisodesConfig.model_validate(base)


def build_world(
    root: Path, size: int = 16, per_class: int = 12, n_normal: int = 60, seed: int = 0
) -> dict[str, Path]:
    """Writes root/store/{images.npy, scan_index.parquet, store.json} and root/episodes/{split.json,
    episodes/val.jsonl, episodes/test.jsonl, leakage_audit.json}. Returns both folders."""
    rng = np.random.default_rng(seed)
    conds = TRAIN + VAL + TEST
    patterns = {c: rng.choice([-1.0, 1.0], size=(size, size)) for c in conds}
    rows, images = [], []
    labels = [c for c in conds for _ in range(per_class)] + [NORMAL] * n_normal
    for i, lab in enumerate(labels):
        img = rng.normal(0.0, 1.0, size=(1, size, size))
        if lab != NORMAL:
            img[0] += patterns[lab]
        images.append(img.astype(np.float16))
        rows.append(
            {
                "scan_key": f"{i:016x}",
                "patient_key": f"{100000 + i:016x}",
                "study_key": f"{200000 + i:016x}",
                "labels": lab,
                "store_index": i,
            }
        )
    index = pd.DataFrame(rows)
    store = root / "store"
    store.mkdir(parents=True)
    np.save(store / "images.npy", np.stack(images))
    index.to_parquet(store / "scan_index.parquet", index=False)
    meta = {
        "n_images": len(rows),
        "normal_label": NORMAL,
        "label_names": conds,
        "shape": [len(rows), 1, size, size],
        "dtype": "float16",
        "spatial_dims": 2,
        "channels": 1,
        "preprocessing": {"size": [size, size], "channels": 1},
    }
    (store / "store.json").write_text(json.dumps(meta))
    built = build_episodes(index, meta, episodes_cfg())
    eps = root / "episodes"
    write_outputs(built, eps)
    return {"store": store, "episodes": eps}
