"""Metrics against hand computations and scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.metrics import confusion_matrix as sk_confusion

from pipeline.evaluate import metrics


def test_ci95_matches_hand_computation() -> None:
    # values 1,0,1,1: mean 0.75; sample variance ((3 * 0.25^2) + 0.75^2) / 3 = 0.25 -> s = 0.5
    # half-width = 1.96 * 0.5 / sqrt(4) = 0.49
    r = metrics.mean_ci95([1.0, 0.0, 1.0, 1.0])
    assert r.mean == pytest.approx(0.75)
    assert r.std == pytest.approx(0.5)
    assert r.ci95 == pytest.approx(0.49)
    assert (r.low, r.high) == (pytest.approx(0.26), pytest.approx(1.24))
    assert r.n == 4


def test_ci95_shrinks_with_sqrt_n_and_is_undefined_for_one_value() -> None:
    v = np.array([0.2, 0.4, 0.6, 0.8])
    small, big = metrics.mean_ci95(v), metrics.mean_ci95(np.tile(v, 25))
    # same spread, 25x the episodes: the interval shrinks by about sqrt(25) = 5 (ddof changes it slightly)
    ratio = small.ci95 / big.ci95
    expected = (np.std(v, ddof=1) / 2) / (np.std(np.tile(v, 25), ddof=1) / 10)
    assert ratio == pytest.approx(expected)
    one = metrics.mean_ci95([0.7])
    assert one.mean == 0.7 and one.ci95 is None and one.low is None
    with pytest.raises(ValueError):
        metrics.mean_ci95([])
    with pytest.raises(ValueError):
        metrics.mean_ci95([0.5, float("nan")])


def test_overlap() -> None:
    a = metrics.MeanCI(0.60, 0.02, 0.1, 100)
    b = metrics.MeanCI(0.65, 0.02, 0.1, 100)  # [0.58, 0.62] vs [0.63, 0.67]
    c = metrics.MeanCI(0.63, 0.02, 0.1, 100)  # [0.61, 0.65]
    assert not a.overlaps(b) and not b.overlaps(a)
    assert a.overlaps(c) and c.overlaps(b)


def _probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    p = rng.dirichlet(np.ones(k), size=n)
    return np.round(p, 1) + 1e-12  # rounding creates ties, which AUC must handle as sklearn does


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    for k in (2, 3, 5):
        for _ in range(5):
            p = _probs(rng, 40, k)
            p = p / p.sum(1, keepdims=True)
            y = np.concatenate([np.arange(k), rng.integers(0, k, size=40 - k)])
            if k == 2:
                ref = roc_auc_score(y == 0, p[:, 0])
            else:
                ref = roc_auc_score(y, p, multi_class="ovr", average="macro")
            assert metrics.macro_auc(p, y) == pytest.approx(ref, abs=1e-12)


def test_auc_degenerate_cases() -> None:
    assert metrics.binary_auc(np.array([0.1, 0.9]), np.array([True, True])) is None
    assert metrics.binary_auc(np.array([0.9, 0.1]), np.array([True, False])) == 1.0
    assert metrics.binary_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5


def test_sensitivity_specificity_hand_values() -> None:
    # classes [condition, normal]; 3 condition queries (2 found), 4 normal queries (3 correct)
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 1, 0])
    p = np.eye(2)[pred] * 0.8 + 0.1
    sens, spec = metrics.sensitivity_specificity(p, y)
    assert sens == pytest.approx(2 / 3) and spec == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        metrics.sensitivity_specificity(np.full((2, 3), 1 / 3), np.array([0, 1]))
    # an episode whose queries are all normal: sensitivity is undefined (None), not 0 and not an error
    assert metrics.sensitivity_specificity(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([1, 1])) == (
        None,
        0.5,
    )


def test_condition_vs_rest_on_three_classes() -> None:
    # condition = class 0; the "rest" are classes 1 and 2, a scan of class 2 predicted 1 is still a true negative
    y = np.array([0, 0, 1, 2, 2])
    pred = np.array([0, 2, 1, 1, 0])
    assert metrics.condition_sensitivity_specificity(pred, y) == (0.5, pytest.approx(2 / 3))
    assert metrics.condition_sensitivity_specificity(pred[2:], y[2:]) == (None, pytest.approx(2 / 3))
    assert metrics.class_recalls(np.array([], dtype=int), np.array([], dtype=int), [0, 1]) == [None, None]
    # per class of a 3-way episode, a class without queries (2) has no recall rather than 0
    assert metrics.class_recalls(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 1]), [0, 1, 2]) == [
        0.5,
        0.5,
        None,
    ]


def test_balanced_accuracy_matches_sklearn_without_its_warning() -> None:
    rng = np.random.default_rng(5)
    for k in (2, 3, 4):
        for _ in range(5):
            y = rng.integers(0, k, size=30)
            pred = rng.integers(0, k, size=30)
            assert metrics.balanced_accuracy(pred, y) == pytest.approx(balanced_accuracy_score(y, pred))
    # a class predicted that y lacks is left out (sklearn warns about it; this must not reach the user)
    y, pred = np.array([1, 1, 1, 2]), np.array([0, 1, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = metrics.balanced_accuracy(pred, y)
    assert got == pytest.approx((2 / 3 + 1) / 2)
    assert math.isnan(metrics.balanced_accuracy(np.array([], dtype=int), np.array([], dtype=int)))


def test_ece_hand_values() -> None:
    # two predictions at confidence 0.95 (one right) and two at 0.65 (both right):
    # |0.5 - 0.95| * 2/4 + |1.0 - 0.65| * 2/4 = 0.225 + 0.175 = 0.4
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.65, 0.35]])
    y = np.array([0, 1, 1, 0])
    assert metrics.ece(p, y, n_bins=10) == pytest.approx(0.4)
    rel = metrics.reliability(p, y, 10)
    assert rel.count.tolist() == [0, 0, 0, 0, 0, 0, 2, 0, 0, 2]
    # a perfectly calibrated model: confidence 0.7, right 7 times out of 10
    p2 = np.tile([[0.7, 0.3]], (10, 1))
    y2 = np.array([0] * 7 + [1] * 3)
    assert metrics.ece(p2, y2) == pytest.approx(0.0, abs=1e-12)
    # 0.7 belongs to the bin (0.6, 0.7], right-inclusive
    assert metrics.reliability(p2, y2).count[6] == 10


def test_accuracy_and_confusion_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=50)
    y = rng.integers(0, 4, size=50)
    assert metrics.accuracy(p, y) == pytest.approx(np.mean(p.argmax(1) == y))
    assert (metrics.confusion_matrix(p, y) == sk_confusion(y, p.argmax(1), labels=range(4))).all()


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="probs must be"):
        metrics.accuracy(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.accuracy(np.full((2, 2), 0.5), np.array([0, 2]))
    assert math.isclose(metrics.accuracy(np.array([[0.2, 0.8]]), np.array([1])), 1.0)
