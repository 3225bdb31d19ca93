"""Classification metrics for few-shot episodes: accuracy with a 95% interval, macro AUC, sensitivity and
specificity (binary episodes), expected calibration error, confusion matrices and reliability bins.

numpy and scikit-learn (`sklearn.metrics` computes AUC, recall and balanced accuracy), no torch and no
mlflow; what sklearn leaves undefined (a class absent from an episode) is None here, never an exception.
Conventions (they matter for the report, so they are fixed here):
- A 95% confidence interval of a mean over episodes is the half-width 1.96 * s / sqrt(n), with s the
  *sample* standard deviation (ddof=1); it is undefined (None) for fewer than two episodes.
- In a binary episode the classes are `[condition, normal]`: the positive class is index 0, so
  sensitivity is recall on the condition and specificity is recall on normal.
- Macro AUC is the unweighted mean of one-vs-rest AUCs over the classes present in `y_true`; for two
  classes it equals the ordinary AUC of the condition score.
- ECE uses equal-width confidence bins over (0, 1], confidence = the top class probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import recall_score, roc_auc_score

Z95 = 1.96


@dataclass(frozen=True)
class MeanCI:
    """A mean over `n` independent units (episodes or seeds) with its 95% half-width and sample std."""

    mean: float
    ci95: float | None
    std: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.ci95 is None else self.mean - self.ci95

    @property
    def high(self) -> float | None:
        return None if self.ci95 is None else self.mean + self.ci95

    def overlaps(self, other: MeanCI) -> bool:
        """Whether the two 95% intervals overlap (an undefined interval is treated as overlapping)."""
        if self.low is None or other.low is None or self.high is None or other.high is None:
            return True
        return self.low <= other.high and other.low <= self.high

    def to_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "ci95": self.ci95, "std": self.std, "n": self.n}


def mean_ci95(values: np.ndarray | list[float]) -> MeanCI:
    """Mean and 95% half-width 1.96 * std(ddof=1) / sqrt(n) over `values` (NaNs are an error)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"mean_ci95 got non-finite values: {v[~np.isfinite(v)][:5]}")
    mean = float(v.mean())
    if v.size < 2:
        return MeanCI(mean=mean, ci95=None, std=None, n=int(v.size))
    std = float(v.std(ddof=1))
    return MeanCI(mean=mean, ci95=Z95 * std / math.sqrt(v.size), std=std, n=int(v.size))


def accuracy(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label. probs (n, n_way), y_true (n,)."""
    probs, y_true = _check(probs, y_true)
    return float(np.mean(probs.argmax(axis=1) == y_true))


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC of `scores` for the boolean `positive` labels (sklearn's `roc_auc_score`, ties counted
    half); None when one class is absent, where the AUC is undefined (sklearn would raise)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.size:
        return None
    return float(roc_auc_score(positive, scores))


def macro_auc(probs: np.ndarray, y_true: np.ndarray) -> float | None:
    """Unweighted mean of one-vs-rest AUCs over the classes present in y_true (None if fewer than 2).

    Not `roc_auc_score(multi_class="ovr")`: that refuses an episode whose queries miss a class (and rows
    that do not sum to 1), while a class absent from y_true is simply left out here."""
    probs, y_true = _check(probs, y_true)
    aucs = []
    for c in range(probs.shape[1]):
        a = binary_auc(probs[:, c], y_true == c)
        if a is not None:
            aucs.append(a)
    if not aucs:
        return None
    return float(np.mean(aucs))


def class_recalls(pred: np.ndarray, y_true: np.ndarray, labels: list[int]) -> list[float | None]:
    """Recall of each of `labels` (sklearn's `recall_score`, per class): the fraction of the scans of that
    class predicted as it; None for a label with no scan in y_true, where recall is undefined."""
    if np.asarray(y_true).size == 0:
        return [None] * len(labels)
    r = recall_score(y_true, pred, labels=labels, average=None, zero_division=np.nan)
    return [None if math.isnan(v) else float(v) for v in r]


def condition_sensitivity_specificity(
    pred: np.ndarray, y_true: np.ndarray
) -> tuple[float | None, float | None]:
    """Condition (class 0) vs the rest from predicted class indices: sensitivity = recall of class 0,
    specificity = the fraction of the other scans not predicted 0. None where that side has no scan.
    For two classes this is the recall of class 0 and of class 1."""
    sens, spec = class_recalls(np.asarray(pred) == 0, np.asarray(y_true) == 0, labels=[True, False])
    return sens, spec


def balanced_accuracy(pred: np.ndarray, y_true: np.ndarray) -> float:
    """Mean over the classes present in `y_true` of the fraction of that class predicted correctly (two
    classes: (sensitivity + specificity) / 2); NaN for no scans.

    sklearn's definition of balanced accuracy, computed as its macro `recall_score` over the classes
    present: `balanced_accuracy_score` gives the same number but warns when a class is predicted that
    y_true lacks, and a binary model predicting one class for every scan is a real outcome here, not a
    user-facing warning (docs/ARCHITECTURE.md, principle 11)."""
    y_true = np.asarray(y_true)
    if y_true.size == 0:
        return math.nan
    return float(recall_score(y_true, pred, labels=np.unique(y_true), average="macro"))


def sensitivity_specificity(probs: np.ndarray, y_true: np.ndarray) -> tuple[float | None, float | None]:
    """For a binary episode with classes [condition, normal]: recall of class 0 and recall of class 1."""
    probs, y_true = _check(probs, y_true)
    if probs.shape[1] != 2:
        raise ValueError(f"sensitivity/specificity need 2 classes, got {probs.shape[1]}")
    return condition_sensitivity_specificity(probs.argmax(axis=1), y_true)


@dataclass(frozen=True)
class Reliability:
    """Per-bin counts, mean confidence and accuracy over equal-width bins of (0, 1]."""

    edges: np.ndarray  # (n_bins + 1,)
    count: np.ndarray  # (n_bins,) int
    confidence: np.ndarray  # (n_bins,) mean top probability in the bin (nan if empty)
    accuracy: np.ndarray  # (n_bins,) fraction correct in the bin (nan if empty)

    @property
    def ece(self) -> float:
        n = self.count.sum()
        if n == 0:
            raise ValueError("ECE of zero predictions")
        used = self.count > 0
        gap = np.abs(self.accuracy[used] - self.confidence[used])
        return float(np.sum(self.count[used] / n * gap))


def reliability(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> Reliability:
    probs, y_true = _check(probs, y_true)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds conf in (edges[b], edges[b+1]]; a confidence of exactly 0 cannot occur (max of a simplex)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mconf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        macc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return Reliability(edges=edges, count=count, confidence=mconf, accuracy=macc)


def ece(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: sum over bins of |bin| / n * |accuracy(bin) - confidence(bin)|."""
    return reliability(probs, y_true, n_bins).ece


def confusion_matrix(probs: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """(n_way, n_way) counts, rows = true class, columns = predicted class."""
    probs, y_true = _check(probs, y_true)
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    return np.bincount(y_true * k + pred, minlength=k * k).reshape(k, k)


def _check(probs: np.ndarray, y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    if probs.ndim != 2 or probs.shape[0] != y_true.size:
        raise ValueError(f"probs must be (n, n_way) with n = len(y_true) = {y_true.size}, got {probs.shape}")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got {y_true.min()}..{y_true.max()}")
    return probs, y_true
