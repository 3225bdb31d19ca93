"""Scan-index builders for the episodes tests (synthetic keys only, no patient information)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.synthetic import NORMAL, synthetic_index

META = {"normal_label": NORMAL}


def index_from_rows(rows: list[tuple[int, str]]) -> pd.DataFrame:
    """(patient number, '|'-joined labels) per scan -> a scan index with hex-like keys."""
    return pd.DataFrame(
        {
            "scan_key": [f"s{i:015x}" for i in range(len(rows))],
            "patient_key": [f"p{p:015x}" for p, _ in rows],
            "labels": [lab for _, lab in rows],
            "store_index": list(range(len(rows))),
        }
    )


def patients(n: int, labels: str, start: int, scans: int = 1) -> list[tuple[int, str]]:
    """`n` patients numbered from `start`, each with `scans` scans labelled `labels`."""
    return [(start + p, labels) for p in range(n) for _ in range(scans)]


# A study shaped like the full demo: 5 common, 3 validation, 3 rare findings, multi-label, several
# scans per patient; rare findings have a few dozen patients.
SMALL_PREVALENCE = {
    "Atelectasis": 0.12,
    "Effusion": 0.12,
    "Infiltration": 0.15,
    "Mass": 0.06,
    "Nodule": 0.06,
    "Cardiomegaly": 0.05,
    "Emphysema": 0.05,
    "Pleural_Thickening": 0.05,
    "Edema": 0.03,
    "Fibrosis": 0.03,
    "Hernia": 0.02,
}


def small_index(seed: int = 0, n_images: int = 3000, n_patients: int = 1000) -> pd.DataFrame:
    return synthetic_index(n_images, n_patients, SMALL_PREVALENCE, seed=seed)


def small_cfg(**over: Any) -> EpisodesConfig:
    base: dict[str, Any] = {
        "split": {
            "rare": ["Edema", "Fibrosis", "Hernia"],
            "validation": ["Cardiomegaly", "Emphysema", "Pleural_Thickening"],
        },
        "kinds": ["binary", "n_way"],
        "n_way": 3,
        "k_shot": [1, 5],
        "q_query": 5,
        "val_episodes": 10,
        "test_episodes": 30,
        "seed": 0,
    }
    base.update(over)
    return EpisodesConfig.model_validate(base)
