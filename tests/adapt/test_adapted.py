"""The adapted model as a library: adaptation helps, save/load is exact, one scan alone = in a batch."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.adapt.adapted import AdaptedClassifier, prob_column, save_adapted
from pipeline.adapt.listing import list_labelled
from pipeline.adapt.scan_spec import ScanSpec
from pipeline.adapt.stage import fit_curve, query_metrics
from pipeline.adapt.support import load_labelled
from pipeline.errors import DataError
from pipeline.meta.model_io import load_meta_model, save_meta_model
from pipeline.meta.models import ModelSpec, build_model
from pipeline.serving import predict_any
from tests.adapt import helpers as h

SALT = b"0" * 64
CLASSES = [h.CONDITION, h.NORMAL]


def _spec() -> ScanSpec:
    return ScanSpec(preprocessing=h.preprocessing(), shape=(1, h.SIZE, h.SIZE), modalities=frozenset({"DX"}))


def _adapt(mm_dir: Path, support: Path, steps: int | None = None) -> AdaptedClassifier:
    mm = load_meta_model(mm_dir)
    s = load_labelled(list_labelled(support), CLASSES, _spec(), SALT)
    method = mm.method(steps=steps)
    return AdaptedClassifier(mm, method, method.fit(s.x, s.y, 2), CLASSES, _spec(), {})


def test_adapting_the_meta_model_improves_query_accuracy(meta_model_dir: Path, sets: dict[str, Path]) -> None:
    mm = load_meta_model(meta_model_dir)
    s = load_labelled(list_labelled(sets["support"]), CLASSES, _spec(), SALT)
    q = load_labelled(list_labelled(sets["query"]), CLASSES, _spec(), SALT)
    method = mm.method()
    states = fit_curve(method, s.x, s.y, 2, 8)
    assert len(states) == 9
    acc = [query_metrics(method.predict_proba(st, q.x).numpy(), q.y.numpy())["accuracy"] for st in states]
    # unadapted, the shared head scores both classes equally (argmax = class 0): chance on a balanced query
    assert acc[0] == pytest.approx(0.5)
    assert acc[-1] >= 0.85, acc
    # the support loss falls with the inner steps
    losses = [
        torch.nn.functional.cross_entropy(torch.log(method.predict_proba(st, s.x)), s.y).item()
        for st in states
    ]
    assert losses[-1] < 0.5 * losses[0], losses
    m = query_metrics(method.predict_proba(states[-1], q.x).numpy(), q.y.numpy())
    assert m["auc"] > 0.9 and m["sensitivity"] > 0.7 and m["specificity"] > 0.7


def test_query_metrics_match_hand_counts() -> None:
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    y = np.array([0, 0, 1, 1])
    m = query_metrics(probs, y)
    assert m["accuracy"] == 0.5 and m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["auc"] == pytest.approx(0.75)  # pairs (pos, neg): (.9>.2) (.9>.7) (.4>.2) (.4<.7) -> 3/4


def test_saved_adapted_model_reloads_to_identical_probabilities(
    meta_model_dir: Path, sets: dict[str, Path], tmp_path: Path
) -> None:
    clf = _adapt(meta_model_dir, sets["support"])
    folder = save_adapted(
        tmp_path / "a",
        meta_model_dir=meta_model_dir,
        adapted=clf.adapted,
        classes=CLASSES,
        spec=_spec(),
        card={"condition": h.CONDITION},
    )
    back = AdaptedClassifier.load(folder)
    assert back.classes == CLASSES and back.spec == _spec()
    paths = sorted(sets["query"].rglob("*.dcm"))
    a = pd.DataFrame(clf.predict_paths(paths))
    b = pd.DataFrame(back.predict_paths(paths))
    np.testing.assert_allclose(
        a[prob_column(h.CONDITION)].to_numpy(), b[prob_column(h.CONDITION)].to_numpy(), atol=1e-6
    )
    with pytest.raises(DataError, match="not an adapted fewscan model"):
        AdaptedClassifier.load(tmp_path)


@pytest.mark.parametrize("norm", ["group", "batch_transductive"])
def test_one_scan_alone_gets_the_same_probabilities_as_in_a_batch(
    norm: str, meta_model_dir: Path, sets: dict[str, Path], tmp_path: Path
) -> None:
    if norm == "group":
        mm_dir = meta_model_dir
    else:  # BatchNorm on batch statistics: batching would change the numbers, so scans are scored alone
        spec = ModelSpec(backbone="conv4", filters=8, blocks=3, norm=norm, head="shared")
        torch.manual_seed(0)
        mm_dir = save_meta_model(
            tmp_path / "bt",
            build_model(spec, 1, (h.SIZE, h.SIZE)),
            method="fomaml",
            model_spec=spec,
            image_shape=(1, h.SIZE, h.SIZE),
            inner={"steps": 2, "lr": 0.3, "trainable": "all"},
            extra={"preprocessing": h.preprocessing()},
        )
    clf = _adapt(mm_dir, sets["support"], steps=3)
    assert clf.per_scan == (norm == "batch_transductive")
    paths = sorted(sets["query"].rglob("*.dcm"))
    batch = clf.predict_paths(paths, batch_size=64)
    alone = [clf.predict_paths([p])[0] for p in paths]
    col = prob_column(h.CONDITION)
    np.testing.assert_allclose([r[col] for r in alone], [r[col] for r in batch], rtol=0, atol=1e-6)
    assert len({round(r[col], 4) for r in batch}) > 1  # not a constant model


def test_every_input_form_gives_the_same_answer_and_bad_rows_get_errors(
    meta_model_dir: Path, sets: dict[str, Path], tmp_path: Path
) -> None:
    clf = _adapt(meta_model_dir, sets["support"])
    paths = sorted(sets["query"].rglob("*.dcm"))[:4]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a scan")
    col = prob_column(h.CONDITION)
    ref = [r[col] for r in predict_any(clf, [str(p) for p in paths])]
    from_df = predict_any(clf, pd.DataFrame({"path": [str(p) for p in paths]}))
    from_b64 = predict_any(
        clf, pd.DataFrame({"dicom_base64": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
    )
    from_bytes = predict_any(clf, [p.read_bytes() for p in paths])
    arrays = np.stack([h.as_model_input(h.render("normal", np.random.default_rng(i))) for i in range(2)])
    from_arrays = predict_any(clf, arrays)
    for rows in (from_df, from_b64, from_bytes):
        np.testing.assert_allclose([r[col] for r in rows], ref, atol=1e-6)
    assert len(from_arrays) == 2 and all(r["error"] == "" for r in from_arrays)
    # a bad row is reported in its row; the other rows are still scored
    mixed = predict_any(
        clf, pd.DataFrame({"path": [str(paths[0]), str(junk), str(tmp_path / "missing.dcm")]})
    )
    assert mixed[0]["error"] == "" and mixed[0][col] == pytest.approx(ref[0], abs=1e-6)
    assert (
        "unreadable" in mixed[1]["error"] and np.isnan(mixed[1][col]) and mixed[1]["predicted_class"] is None
    )
    assert "does not exist" in mixed[2]["error"]
    bad64 = predict_any(clf, pd.DataFrame({"dicom_base64": ["%%%"]}))
    assert "base64" in bad64[0]["error"]
    wrong = predict_any(clf, [np.zeros((3, h.SIZE, h.SIZE), np.float32)])
    assert "shape (3, 32, 32)" in wrong[0]["error"]
    assert "already be preprocessed" in wrong[0]["error"] and wrong[0]["predicted_class"] is None
    nan_in = np.full((1, h.SIZE, h.SIZE), np.nan, np.float32)
    assert predict_any(clf, [nan_in, arrays[0]])[0]["error"] == "an input array holds NaN or inf"
    with pytest.raises(DataError, match="exactly one of the columns path, dicom_base64, bytes, array"):
        predict_any(clf, pd.DataFrame({"file": ["x"]}))


def test_probabilities_are_a_distribution_and_predicted_class_is_the_argmax(
    meta_model_dir: Path, sets: dict[str, Path]
) -> None:
    clf = _adapt(meta_model_dir, sets["support"])
    rows = clf.predict_paths(sorted(sets["query"].rglob("*.dcm")))
    p = np.array([[r[prob_column(c)] for c in CLASSES] for r in rows])
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    assert [r["predicted_class"] for r in rows] == [CLASSES[i] for i in p.argmax(1)]


def test_meta_model_folder_missing_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(DataError, match="not a meta-model folder"):
        load_meta_model(tmp_path / "m")
    shutil.rmtree(tmp_path / "m")


def test_the_logged_curve_is_one_adaptation_run_ending_in_the_fitted_model(
    meta_model_dir: Path, sets: dict[str, Path]
) -> None:
    mm = load_meta_model(meta_model_dir)
    s = load_labelled(list_labelled(sets["support"]), CLASSES, _spec(), SALT)
    method = mm.method(steps=4)
    states = fit_curve(method, s.x, s.y, 2, 4)
    assert len(states) == 5
    fitted = method.fit(s.x, s.y, 2)
    assert states[-1].params is not None and fitted.params is not None
    for k, v in fitted.params.items():
        torch.testing.assert_close(states[-1].params[k], v)
    two = method.fit(s.x, s.y, 2, steps=2)
    assert two.params is not None
    for k, v in two.params.items():
        torch.testing.assert_close(states[2].params[k], v)
