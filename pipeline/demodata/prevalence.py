"""Finding prevalence: the NIH ChestX-ray14 label table scaled to the requested study size.

The NIH table counts images per label (an image with two findings counts for both). Scaled to a few
thousand images the rarest findings would get a handful of images, too few for patient-disjoint k-shot
episodes, so every finding gets at least `min_per_finding` images. A floor keeps the ordering
non-increasing (max(non-increasing sequence, constant) is non-increasing), so rare stays rare.

The table implies 81,176 labels on 51,759 abnormal images: 1.57 labels per abnormal image (NIH: about
18% of all images, ~40% of abnormal ones, carry 2+ labels). We keep the table's No Finding share and
let the multi-label rate follow from it; when the floor inflates the label total, normal images give
way so that abnormal images average at most `MAX_LABELS_PER_ABNORMAL` labels.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import ConfigError

NORMAL = "No Finding"

# NIH ChestX-ray14 (Data_Entry_2017): images per label, most common first.
NIH_COUNTS: dict[str, int] = {
    NORMAL: 60361,
    "Infiltration": 19894,
    "Effusion": 13317,
    "Atelectasis": 11559,
    "Nodule": 6331,
    "Mass": 5782,
    "Pneumothorax": 5302,
    "Consolidation": 4667,
    "Pleural_Thickening": 3385,
    "Cardiomegaly": 2776,
    "Emphysema": 2516,
    "Edema": 2303,
    "Fibrosis": 1686,
    "Pneumonia": 1431,
    "Hernia": 227,
}
NIH_TOTAL_IMAGES = 112120
FINDINGS: tuple[str, ...] = tuple(k for k in NIH_COUNTS if k != NORMAL)
MAX_LABELS_PER_ABNORMAL = 1.6
# Among multi-label images, the share with three labels rather than two (NIH: roughly one in four).
THREE_LABEL_SHARE = 0.25


def target_counts(n_images: int, min_per_finding: int) -> tuple[dict[str, int], int]:
    """(images per finding, number of normal images) for a study of `n_images` labelled images."""
    if n_images < 1:
        raise ConfigError(f"n_images={n_images}: the study needs at least 1 image")
    if min_per_finding < 0:
        raise ConfigError(f"min_per_finding={min_per_finding}: must be >= 0")
    scale = n_images / NIH_TOTAL_IMAGES
    counts = {f: max(int(round(NIH_COUNTS[f] * scale)), min_per_finding, 1) for f in FINDINGS}
    total_labels = sum(counts.values())
    normal = int(round(NIH_COUNTS[NORMAL] * scale))
    abnormal = max(n_images - normal, math.ceil(total_labels / MAX_LABELS_PER_ABNORMAL))
    if abnormal > n_images or abnormal > total_labels:
        # Tiny studies: at least one label per abnormal image, and the floor must fit.
        need = math.ceil(total_labels / MAX_LABELS_PER_ABNORMAL)
        raise ConfigError(
            f"n_images={n_images} is too small for min_per_finding={min_per_finding} over "
            f"{len(FINDINGS)} findings ({total_labels} labels need >= {need} abnormal images); "
            f"raise --images or lower min_per_finding"
        )
    return counts, n_images - abnormal


def assign_label_sets(counts: dict[str, int], n_abnormal: int, rng: np.random.Generator) -> list[list[str]]:
    """Distribute exactly `counts[f]` labels over `n_abnormal` images, 1-3 distinct labels each.

    Labels are dealt at random, then duplicates inside one image are swapped away, so which findings
    co-occur is random (as a first approximation of NIH's co-occurrence) but the totals are exact.
    """
    total = sum(counts.values())
    extra = total - n_abnormal  # labels beyond the first of each image
    if extra < 0:
        raise ConfigError(f"{total} labels cannot cover {n_abnormal} abnormal images")
    three = min(int(round(extra * THREE_LABEL_SHARE / (1 + THREE_LABEL_SHARE))), extra // 2)
    two = extra - 2 * three
    if two + three > n_abnormal:
        raise ConfigError(f"{total} labels on {n_abnormal} images would need more than 3 labels per image")
    k = np.ones(n_abnormal, dtype=np.int64)
    multi = rng.permutation(n_abnormal)[: two + three]
    k[multi[:two]] = 2
    k[multi[two:]] = 3
    pool = np.array([f for f in FINDINGS for _ in range(counts[f])], dtype=object)
    pool = pool[rng.permutation(len(pool))]
    starts = np.concatenate([[0], np.cumsum(k)[:-1]])
    sets = [list(pool[s : s + n]) for s, n in zip(starts, k)]
    # Repair: swap a duplicated label with a label of another image that takes it without duplication.
    for i, labels in enumerate(sets):
        while len(set(labels)) < len(labels):
            dup_pos = next(p for p in range(1, len(labels)) if labels[p] in labels[:p])
            dup = labels[dup_pos]
            for j in rng.permutation(len(sets)):
                if j == i or dup in sets[j]:
                    continue
                q = int(rng.integers(len(sets[j])))
                other = sets[j][q]
                if other not in labels:
                    sets[j][q], labels[dup_pos] = dup, other
                    break
            else:  # pragma: no cover - only possible if one finding outnumbers the abnormal images
                raise ConfigError(f"cannot place {counts[dup]} '{dup}' labels on {n_abnormal} images")
    order = {f: i for i, f in enumerate(FINDINGS)}
    return [sorted(s, key=order.__getitem__) for s in sets]
