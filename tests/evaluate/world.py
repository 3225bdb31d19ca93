"""A tiny, fully synthetic few-shot world for the evaluate tests: an image store, split.json, fixed
validation/test episodes and untrained meta-models — written to disk exactly as the upstream stages do.

Each condition has its own fixed spatial pattern added to noise; normal scans carry none. So the tasks
are learnable (a method that uses the support set beats chance) but not trivial at k=1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.artifacts import ConditionInfo, PoolCount, SplitFile, write_artifact
from pipeline.episodes.batch import episode_arrays
from pipeline.episodes.episode import Episode, write_episodes
from pipeline.ingest.store import ImageStore
from pipeline.meta.model_io import MetaModel, save_meta_model
from pipeline.meta.models import ModelSpec, build_model

NORMAL = "No Finding"
POOLS = {"train": ["Alpha", "Beta"], "val": ["Gamma"], "test": ["Delta", "Epsilon"]}
SIZE = 16
SPEC = ModelSpec(backbone="conv4", filters=8, blocks=2, norm="group", norm_groups=4)


@dataclass
class World:
    root: Path
    store: ImageStore
    split: SplitFile
    val: list[Episode]
    test: list[Episode]
    meta_models: dict[str, MetaModel]

    def load(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return episode_arrays(ep, self.store)


def _key(i: int) -> str:
    return f"{i:016x}"


def build_world(
    root: Path,
    *,
    per_class: int = 14,
    k: int = 2,
    q: int = 3,
    n_test: int = 12,
    n_val: int = 8,
    seed: int = 0,
) -> World:
    rng = np.random.default_rng(seed)
    conds = [c for cs in POOLS.values() for c in cs]
    patterns = {c: rng.choice([-1.0, 1.0], size=(SIZE, SIZE)) * 1.2 for c in conds}
    rows: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    pools: dict[str, dict[str, list[str]]] = {p: {} for p in POOLS}

    def add(labels: list[str], pool: str) -> str:
        i = len(rows)
        img = rng.normal(0.0, 1.0, size=(1, SIZE, SIZE))
        for c in labels:
            if c != NORMAL:
                img[0] += patterns[c]
        key = _key(i)
        rows.append(
            {
                "scan_key": key,
                "patient_key": _key(10_000 + i),  # one scan per patient: pools are patient-disjoint
                "study_key": _key(20_000 + i),
                "labels": "|".join(sorted(labels)),
                "store_index": i,
            }
        )
        images.append(img.astype(np.float16))
        for c in labels:
            pools[pool].setdefault(c, []).append(key)
        return key

    for pool, cs in POOLS.items():
        for c in cs:
            for _ in range(per_class):
                add([c], pool)
        for _ in range(per_class * 2):
            add([NORMAL], pool)
    for _ in range(4):  # multi-label scans of the train pool: the traditional classifier must skip them
        add(["Alpha", "Beta"], "train")

    store_dir = root / "store"
    store_dir.mkdir(parents=True)
    np.save(store_dir / "images.npy", np.stack(images))
    pd.DataFrame(rows).to_parquet(store_dir / "scan_index.parquet", index=False)
    (store_dir / "store.json").write_text(json.dumps({"n_images": len(rows), "normal_label": NORMAL}))
    store = ImageStore.open(store_dir)

    def patients(keys: list[str]) -> int:  # one scan per patient in this world
        return len(keys)

    split = SplitFile(
        normal_label=NORMAL,
        conditions={
            c: ConditionInfo(
                split=p,
                pool=p,
                images=patients(pools[p][c]),
                patients=patients(pools[p][c]),  # type: ignore[arg-type]
            )
            for p, cs in POOLS.items()
            for c in cs
        },
        normal={p: PoolCount(images=len(pools[p][NORMAL]), patients=len(pools[p][NORMAL])) for p in POOLS},
        pools=pools,
        pool_patients={p: len({k for ks in pools[p].values() for k in ks}) for p in POOLS},
        pool_images={p: len({k for ks in pools[p].values() for k in ks}) for p in POOLS},
        pool_rule="by condition (test fixture)",
        kinds=["binary", "n_way"],
        k_shots=[k],
        q_query=q,
        n_way=3,
        multilabel="exclusive_in_episode",
        patients_needed_per_class=k + q,
        seed=seed,
    )
    write_artifact(root / "split.json", split)

    ep_rng = np.random.default_rng(seed + 1)

    def episodes(pool: str, n: int, start: int) -> list[Episode]:
        out = []
        i = start
        for kind in ("binary", "n_way"):
            for j in range(n):
                cs = POOLS[pool]
                if kind == "binary":
                    classes = [cs[j % len(cs)], NORMAL]
                else:
                    if len(cs) < 2:
                        classes = [
                            cs[0],
                            NORMAL,
                        ]  # a 1-condition pool gives 2-way "n_way" episodes with normal
                    else:
                        classes = list(cs)
                sup, qry = {}, {}
                for c in classes:
                    keys = [
                        kk
                        for kk in pools[pool][c]
                        if "|" not in next(r["labels"] for r in rows if r["scan_key"] == kk)
                    ]
                    pick = ep_rng.choice(len(keys), size=k + q, replace=False)
                    sup[c] = [keys[p] for p in pick[:k]]
                    qry[c] = [keys[p] for p in pick[k:]]
                out.append(Episode(id=i, kind=kind, k_shot=k, classes=classes, support=sup, query=qry))
                i += 1
        return out

    val = episodes("val", n_val, 0)
    test = episodes("test", n_test, 0)
    write_episodes(root / "episodes" / "val.jsonl", val)
    write_episodes(root / "episodes" / "test.jsonl", test)

    metas = {}
    for name, method in (("maml", "maml"), ("protonet", "protonet")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            model = build_model(SPEC, 1, (SIZE, SIZE))
        folder = root / "models" / name
        save_meta_model(
            folder,
            model,
            method=method,
            model_spec=SPEC,
            image_shape=(1, SIZE, SIZE),
            inner={"steps": 3, "lr": 0.1, "trainable": "all"},
        )
        from pipeline.meta.model_io import load_meta_model

        metas[name] = load_meta_model(folder)
    return World(root, store, split, val, test, metas)
