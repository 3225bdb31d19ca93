"""How an adapted model turns probabilities into a predicted class, and how well that does on held-out
support scans (docs/adapt.md, "Decision threshold").

A few-shot adaptation moves the network only a little (a few inner steps at a small learning rate), and
what moves most is a shift common to every scan: after adaptation all query scans' probabilities of the
condition may lie between 0.46 and 0.48, ranked fairly well (AUC 0.6-0.7) yet all below 0.5. The argmax
then calls every scan normal (sensitivity 0) while the ranking carries the signal. So a binary adapted
model keeps its probabilities as they are and carries a threshold on p(condition):

- `support` (the default): the probability halfway, in log-odds, between the mean score of the
  condition's support scans and that of the other class's, on the adapted model's own support scores.
  It moves with the model's common shift, which is what matters here. It is chosen on the scans the model
  was adapted on (in-sample), so it is optimistic: a model that memorised its support scans scores them
  more extremely than new scans. How well the rule does on scans it has not seen is measured, not assumed:
- the cross-validated estimate: every support scan is scored by a model adapted WITHOUT it (leave one out
  up to `folds` scans, else `folds` class-stratified folds; same method, steps, lr and loss), whose own
  rule (its threshold from ITS support scores) predicts the held-out scan. The balanced accuracy,
  sensitivity and specificity of those predictions estimate the rule's on new scans, slightly
  pessimistically (each fold has fewer scans). Why not choose the threshold on these held-out scores: each
  fold's model has its own common shift, as large as the spread of the scores, so a threshold read off
  pooled held-out scores does not transfer to the final model (on the demo study it predicted one class for
  every query scan after up to 56% of support sets, the in-sample midpoint after none; docs/adapt.md).
- `argmax`: the threshold 0.5, the network's own rule; or a probability given in the config.

A model of more than two classes always predicts the argmax (a threshold is a binary rule); its
cross-validated estimate is still made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.evaluate.metrics import balanced_accuracy, condition_sensitivity_specificity
from pipeline.meta.methods import FewShotMethod

RULES = ("support", "argmax")
# Scores are clipped to [EPS, 1 - EPS] before the log-odds: one saturated scan must not decide the midpoint.
EPS = 1e-6


def predicted_index(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Predicted class index per row: for two classes with a threshold, 0 (the condition) when
    p(condition) >= threshold, else 1; otherwise the argmax."""
    probs = np.asarray(probs)
    if threshold is None or probs.ndim != 2 or probs.shape[1] != 2:
        return probs.argmax(axis=1)
    return np.where(probs[:, 0] >= threshold, 0, 1)


def midpoint_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    """The probability halfway, in log-odds, between the mean log-odds of the condition's scans (y == 0)
    and that of the others': the balanced Bayes rule if each class's log-odds were normal with one variance."""
    p = np.clip(np.asarray(scores, dtype=np.float64), EPS, 1 - EPS)
    logit = np.log(p / (1 - p))
    mid = 0.5 * (logit[y == 0].mean() + logit[y != 0].mean())
    return float(1.0 / (1.0 + math.exp(-mid)))


def rule_threshold(rule: str | float, probs: np.ndarray, y: np.ndarray) -> float | None:
    """The threshold `rule` gives a model whose support scans (labels `y`) it scores `probs`; None for a
    model of more than two classes (argmax)."""
    if probs.shape[1] != 2:
        return None
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return float(rule)
    if rule == "argmax":
        return 0.5
    if rule == "support":
        return midpoint_threshold(probs[:, 0], y)
    raise ValueError(f"threshold rule {rule!r}: choose one of {', '.join(RULES)} or a probability")


def stratified_folds(y: np.ndarray, n_folds: int) -> list[np.ndarray]:
    """Indices of `min(n_folds, len(y))` held-out folds; each class's scans are dealt out in turn, so a fold
    takes at most ceil(n_c / n_folds) scans of a class of n_c. Deterministic (support order)."""
    k = max(1, min(int(n_folds), len(y)))
    folds: list[list[int]] = [[] for _ in range(k)]
    j = 0
    for c in np.unique(y):
        for i in np.flatnonzero(y == c):
            folds[j % k].append(int(i))
            j += 1
    return [np.array(sorted(f), dtype=np.int64) for f in folds if f]


def cross_validate(
    rule: str | float,
    method: FewShotMethod,
    x: torch.Tensor,
    y: torch.Tensor,
    n_way: int,
    steps: int,
    n_folds: int,
) -> dict[str, Any]:
    """The rule's predictions for held-out support scans (see the module docstring): balanced accuracy,
    sensitivity (recall of class 0, the condition), specificity (of the rest), folds, how they were made."""
    y_np = y.numpy()
    pred = np.zeros(len(y_np), dtype=np.int64)
    folds = stratified_folds(y_np, n_folds)
    for held in folds:
        keep = np.setdiff1d(np.arange(len(y_np)), held)
        adapted = method.fit(x[torch.from_numpy(keep)], y[torch.from_numpy(keep)], n_way, steps=steps)
        probs = method.predict_proba(adapted, x).double().numpy()
        t = rule_threshold(rule, probs[keep], y_np[keep])
        pred[held] = predicted_index(probs[held], t)
    sens, spec = condition_sensitivity_specificity(pred, y_np)
    return {
        "cv_balanced_accuracy": balanced_accuracy(pred, y_np),
        # a support set holds every class (min_per_class >= 1), so neither is undefined; NaN if one were
        "cv_sensitivity": math.nan if sens is None else sens,
        "cv_specificity": math.nan if spec is None else spec,
        "cv_folds": len(folds),
        "cv_how": "leave-one-out" if all(len(f) == 1 for f in folds) else f"{len(folds)} stratified folds",
    }


def choose(
    rule: str | float,
    method: FewShotMethod,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[str],
    steps: int,
    support_probs: np.ndarray,
    n_folds: int,
) -> dict[str, Any]:
    """The decision rule of an adapted model as its card stores it (`adapted.json` "decision"):
    {"rule": "threshold"|"argmax", "threshold", "chosen_by", "cv_*" (the held-out estimate, when every
    class has 2+ support scans and n_folds >= 2)}. `support_probs`: the adapted model's probabilities on
    the support scans (x, y)."""
    n_way = len(classes)
    y_np = y.numpy()
    t = rule_threshold(rule, support_probs, y_np)
    out: dict[str, Any]
    if t is None:
        out = {"rule": "argmax", "chosen_by": f"{n_way} classes: a threshold is a binary rule"}
    else:
        how = {
            "support": "midpoint of the support scans' own scores (in-sample: optimistic)",
            "argmax": "argmax (adapt.threshold)",
        }
        out = {
            "rule": "threshold",
            "threshold": t,
            "positive_class": classes[0],
            "chosen_by": how.get(str(rule), "given (adapt.threshold)"),
        }
    smallest = int(np.bincount(y_np, minlength=n_way).min())
    if n_folds >= 2 and smallest >= 2:
        out.update(cross_validate(rule, method, x, y, n_way, steps, n_folds))
    else:
        why = "cv_folds < 2" if n_folds < 2 else f"a class has {smallest} support scan(s)"
        out["cv_how"] = f"none ({why})"
    return out
