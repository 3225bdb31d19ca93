"""The decision rule of an adapted model (pipeline/adapt/decision.py) and the class-balanced inner loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.adapt import decision as D
from pipeline.adapt.adapted import AdaptedClassifier, save_adapted
from pipeline.adapt.scan_spec import ScanSpec
from pipeline.errors import DataError
from pipeline.evaluate import metrics as M
from pipeline.meta.methods import class_balanced_cross_entropy
from pipeline.meta.model_io import load_meta_model
from tests.adapt import helpers as h

CLASSES = [h.CONDITION, h.NORMAL]


def test_predicted_index_applies_the_threshold_to_binary_models_only() -> None:
    probs = np.array([[0.47, 0.53], [0.45, 0.55], [0.60, 0.40]])
    assert D.predicted_index(probs, None).tolist() == [1, 1, 0]  # argmax
    assert D.predicted_index(probs, 0.46).tolist() == [0, 1, 0]  # p(condition) >= 0.46
    assert D.predicted_index(probs, 0.5).tolist() == [1, 1, 0]  # 0.5 is the argmax
    three = np.array([[0.2, 0.5, 0.3], [0.4, 0.3, 0.3]])
    assert D.predicted_index(three, 0.1).tolist() == [1, 0]  # more than two classes: argmax


def test_balanced_accuracy_is_chance_for_a_model_that_predicts_one_class() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    assert M.balanced_accuracy(np.ones(10, dtype=int), y) == 0.5  # plain accuracy would be 0.7
    assert M.balanced_accuracy(np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0]), y) == pytest.approx(
        (1 / 3 + 6 / 7) / 2
    )


def test_midpoint_threshold_follows_a_shift_common_to_every_scan() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    # symmetric scores: the midpoint is 0.5
    assert D.midpoint_threshold(np.array([0.8, 0.9, 0.7, 0.2, 0.1, 0.3]), y) == pytest.approx(0.5, abs=0.02)
    # a barely adapted model: every score below 0.5, the condition's still higher -> a threshold between them
    shifted = np.array([0.473, 0.471, 0.470, 0.462, 0.448, 0.455])
    t = D.midpoint_threshold(shifted, y)
    assert 0.462 < t < 0.470
    assert D.predicted_index(np.stack([shifted, 1 - shifted], 1), t).tolist() == [0, 0, 0, 1, 1, 1]
    # one saturated score does not run away with it
    assert 0.0 < D.midpoint_threshold(np.array([1.0, 0.9, 0.8, 0.0, 0.1, 0.2]), y) < 1.0


def test_folds_hold_out_one_scan_up_to_the_fold_count_and_keep_every_class() -> None:
    y = np.array([0] * 3 + [1] * 7)
    folds = D.stratified_folds(y, 10)
    assert len(folds) == 10 and all(len(f) == 1 for f in folds)  # leave-one-out
    y = np.array([0] * 5 + [1] * 20)
    folds = D.stratified_folds(y, 10)
    assert len(folds) == 10 and sorted(np.concatenate(folds).tolist()) == list(range(25))
    for f in folds:
        kept = np.setdiff1d(np.arange(25), f)
        assert set(y[kept]) == {0, 1}


def test_class_balanced_loss_weighs_classes_not_scans() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 2)
    balanced = torch.tensor([0] * 6 + [1] * 6)
    assert class_balanced_cross_entropy(logits, balanced).item() == pytest.approx(
        F.cross_entropy(logits, balanced).item(), rel=1e-6
    )
    y = torch.tensor([0] * 3 + [1] * 9)
    per_scan = F.cross_entropy(logits, y, reduction="none")
    expected = 0.5 * (per_scan[:3].mean() + per_scan[3:].mean())
    assert class_balanced_cross_entropy(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_saved_threshold_decides_the_predicted_class_and_old_cards_mean_argmax(
    meta_model_dir: Path, tmp_path: Path
) -> None:
    """predict and serving go through AdaptedClassifier._rows: the card's threshold is the rule, the
    probabilities stay the network's. A card without a decision (version 1) predicts the argmax."""
    mm = load_meta_model(meta_model_dir)
    spec = ScanSpec(preprocessing=h.preprocessing(), shape=(1, h.SIZE, h.SIZE), modalities=frozenset({"DX"}))
    rng = np.random.default_rng(0)
    x_s = torch.from_numpy(
        np.stack([h.as_model_input(h.render(p, rng)) for p in ["disc"] * 3 + ["normal"] * 3])
    )
    adapted = mm.method().fit(x_s, torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    arrays = [h.as_model_input(h.render(p, rng)) for p in ("disc", "normal", "disc", "normal")]

    def saved(card: dict) -> AdaptedClassifier:
        folder = save_adapted(
            tmp_path / str(len(list(tmp_path.iterdir()))),
            meta_model_dir=meta_model_dir,
            adapted=adapted,
            classes=CLASSES,
            spec=spec,
            card=card,
        )
        return AdaptedClassifier.load(folder)

    plain = saved({})
    assert plain.threshold is None
    rows = plain.predict_arrays(arrays)
    p0 = np.array([r[f"prob_{h.CONDITION}"] for r in rows])
    assert [r["predicted_class"] for r in rows] == [CLASSES[int(p < 0.5)] for p in p0]
    t = float(np.median(p0)) + 1e-9  # a threshold that splits these four scans whatever the network says
    ruled = saved({"decision": {"rule": "threshold", "threshold": t}})
    assert ruled.threshold == pytest.approx(t)
    rows_t = ruled.predict_arrays(arrays)
    assert [r[f"prob_{h.CONDITION}"] for r in rows_t] == pytest.approx(list(p0))  # probabilities untouched
    assert [r["predicted_class"] for r in rows_t] == [CLASSES[int(p < t)] for p in p0]
    # a card from a newer fewscan is refused, not half-read
    card = ruled.card | {"version": 99}
    folder = tmp_path / "new"
    save_adapted(
        folder, meta_model_dir=meta_model_dir, adapted=adapted, classes=CLASSES, spec=spec, card=card
    )
    with pytest.raises(DataError, match="has version 99; this fewscan reads up to 2"):
        AdaptedClassifier.load(folder)
