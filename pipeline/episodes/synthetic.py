"""Synthetic scan indexes with the structure of NIH ChestX-ray14 (multi-label, several scans per
patient, findings clustered within patients), for tests and benchmarks of the episodes stage.

No patient information: keys are bijective scrambles of row numbers, formatted like ingest's salted
hashes (16 hex characters).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NORMAL = "No Finding"
# Image counts of the 14 findings in NIH ChestX-ray14 (112,120 images, 30,805 patients).
NIH_COUNTS = {
    "Atelectasis": 11559,
    "Cardiomegaly": 2776,
    "Consolidation": 4667,
    "Edema": 2303,
    "Effusion": 13317,
    "Emphysema": 2516,
    "Fibrosis": 1686,
    "Hernia": 227,
    "Infiltration": 19894,
    "Mass": 5782,
    "Nodule": 6331,
    "Pleural_Thickening": 3385,
    "Pneumonia": 1431,
    "Pneumothorax": 5302,
}
NIH_IMAGES, NIH_PATIENTS = 112_120, 30_805
_ODD = 0x9E3779B97F4A7C15  # multiplication by an odd number is a bijection mod 2**64


def _keys(ids: np.ndarray, salt: int) -> list[str]:
    mixed = (ids.astype(np.uint64) * np.uint64(_ODD)) ^ np.uint64(salt)
    return [f"{int(v):016x}" for v in mixed]


def synthetic_index(
    n_images: int = NIH_IMAGES,
    n_patients: int = NIH_PATIENTS,
    prevalence: dict[str, float] | None = None,
    seed: int = 0,
    within_patient: float = 0.6,
) -> pd.DataFrame:
    """A scan index (scan_key, patient_key, labels, store_index) with `n_images` rows.

    `prevalence`: condition -> fraction of images carrying it (default: NIH ChestX-ray14's). A patient
    "has" a condition with probability prevalence / within_patient, and each of their scans then shows
    it with probability `within_patient`, so findings cluster within patients as in real data.
    """
    if n_patients > n_images:
        raise ValueError("need at least one image per patient")
    rng = np.random.default_rng(seed)
    prev = prevalence if prevalence is not None else {k: v / NIH_IMAGES for k, v in NIH_COUNTS.items()}
    names = sorted(prev)
    # scans per patient: geometric on {1, 2, ...} with mean n_images / n_patients, nudged to the exact total
    counts = rng.geometric(n_patients / n_images, size=n_patients)
    diff = n_images - int(counts.sum())
    while diff != 0:
        idx = rng.integers(0, n_patients, size=abs(diff))
        if diff > 0:
            np.add.at(counts, idx, 1)
        else:
            take = idx[counts[idx] > 1]
            take = np.unique(take)[:-diff]
            counts[take] -= 1
        diff = n_images - int(counts.sum())
    patient_of = np.repeat(np.arange(n_patients), counts)  # (N,)

    p_patient = np.array([min(1.0, prev[n] / within_patient) for n in names])
    has = rng.random((n_patients, len(names))) < p_patient[None, :]  # (P, L)
    findings = has[patient_of] & (rng.random((n_images, len(names))) < within_patient)  # (N, L)
    name_arr = np.array(names, dtype=object)
    labels = [("|".join(name_arr[row]) if row.any() else NORMAL) for row in findings]

    order = rng.permutation(n_images)  # rows not grouped by patient, as in a real index
    return pd.DataFrame(
        {
            "scan_key": _keys(np.arange(n_images), salt=seed * 7919 + 1),
            "patient_key": np.array(_keys(np.arange(n_patients), salt=seed * 104729 + 2))[patient_of[order]],
            "labels": np.array(labels, dtype=object)[order],
            "store_index": np.arange(n_images),
        }
    )
