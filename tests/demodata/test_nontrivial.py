"""The few-shot problem is not trivial: raw-pixel logistic regression needs many examples.

A rare finding (Hernia) against normal, on vendor-encoded pixels read back the way ingest would read
them (modality LUT, MONOCHROME1 inverted, per-image standardised, downsampled 64 -> 32): 5 examples per
class do clearly worse than 200, averaged over resamples so the test is not at the mercy of one draw.
Every image is a different patient, and test patients are never training patients.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from pipeline.demodata.render import render_radiograph
from pipeline.demodata.vendors import VENDORS

SIZE, N_TRAIN, N_TEST, RESAMPLES = 64, 200, 100, 6


def _features(stored: np.ndarray, hdr: dict) -> np.ndarray:
    x = stored.astype(np.float64) * hdr["RescaleSlope"] + hdr["RescaleIntercept"]
    if hdr["PhotometricInterpretation"] == "MONOCHROME1":
        x = -x
    x = x.reshape(SIZE // 2, 2, SIZE // 2, 2).mean((1, 3))
    return ((x - x.mean()) / (x.std() + 1e-9)).ravel()


def _dataset(labels: tuple[str, ...], first_patient: int, n: int) -> np.ndarray:
    out = []
    for i in range(n):
        p = first_patient + i
        view = "AP" if p % 5 < 2 else "PA"
        stored, hdr = render_radiograph(0, p, p, labels, view, SIZE, VENDORS[p % len(VENDORS)])
        out.append(_features(stored, hdr))
    return np.stack(out)


def _accuracy(xp, xn, k, test_p, test_n, rng):
    i, j = rng.choice(len(xp), k, replace=False), rng.choice(len(xn), k, replace=False)
    x = np.concatenate([xp[i], xn[j]])
    y = np.r_[np.ones(k), np.zeros(k)]
    clf = LogisticRegression(C=1.0, max_iter=3000).fit(x, y)
    xt = np.concatenate([test_p, test_n])
    yt = np.r_[np.ones(len(test_p)), np.zeros(len(test_n))]
    return float((clf.predict(xt) == yt).mean())


@pytest.mark.e2e
def test_rare_finding_needs_many_examples_on_raw_pixels():
    pos = _dataset(("Hernia",), 0, N_TRAIN + N_TEST)
    neg = _dataset((), 10_000, N_TRAIN + N_TEST)
    tp, tn = pos[N_TRAIN:], neg[N_TRAIN:]
    rng = np.random.default_rng(0)
    acc5 = np.mean([_accuracy(pos[:N_TRAIN], neg[:N_TRAIN], 5, tp, tn, rng) for _ in range(RESAMPLES)])
    acc200 = np.mean([_accuracy(pos[:N_TRAIN], neg[:N_TRAIN], 200, tp, tn, rng) for _ in range(RESAMPLES)])
    print(f"raw-pixel logistic regression, Hernia vs normal: 5/class {acc5:.3f}, 200/class {acc200:.3f}")
    # Deterministic (fixed seeds); measured 5/class 0.514, 200/class 0.635 when written.
    assert acc200 >= acc5 + 0.08  # clearly worse with 5 per class ...
    assert acc200 > 0.58  # ... although the finding is learnable from enough data
    assert acc5 < 0.75  # and 5 examples do not already solve it
