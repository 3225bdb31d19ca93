"""Traditional baselines: the pretraining set, the classifier learns, head-only == the engine's head
adaptation, and everything is deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.evaluate import baselines
from pipeline.evaluate.config import PretrainConfig
from pipeline.meta.methods import GradientMethod
from tests.evaluate.world import NORMAL, SIZE, SPEC, World, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"), per_class=20)


def test_pretrain_data_is_the_train_pool_single_label_scans(world: World) -> None:
    d = baselines.pretrain_data(world.split, world.store.index, world.store.rows_for)
    assert d.classes == sorted(["Alpha", "Beta", NORMAL])
    assert d.n_multi_label_dropped == 4
    labels = world.store.index.set_index("store_index").loc[d.rows, "labels"].tolist()
    assert all("|" not in lab for lab in labels)
    assert [d.classes[y] for y in d.y] == labels
    train_keys = world.split.pool_keys("train")
    keys = world.store.index.set_index("store_index").loc[d.rows, "scan_key"]
    assert set(keys) <= train_keys
    assert np.bincount(d.y).tolist() == [20, 20, 40]


def test_pretrain_data_needs_a_train_pool(world: World) -> None:
    with pytest.raises(DataError, match="train pool"):
        no_train = world.split.model_copy(update={"pools": {"val": world.split.pools["val"]}})
        baselines.pretrain_data(no_train, world.store.index, world.store.rows_for)


def test_the_hold_out_takes_whole_patients_in_two_disjoint_halves() -> None:
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i:02d}" for i in range(20)], rng.integers(1, 5, size=20))
    idx = np.arange(patients.size)[::-1]  # any order of rows; each half keeps it
    tr, stop, rep, n_stop, n_rep = baselines._split_holdout(patients, idx, 0.5, np.random.default_rng(7))
    # every row lands in exactly one part, and no patient has rows in two parts
    assert sorted(np.concatenate([tr, stop, rep]).tolist()) == list(range(patients.size))
    parts = [set(patients[p]) for p in (tr, stop, rep)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    # floor(0.5 * 20) = 10 hold-out patients, halved; the counts are those of the patients in each half
    assert (len(parts[1]), len(parts[2]), n_stop, n_rep) == (5, 5, 5, 5)
    assert [list(p) for p in (tr, stop, rep)] == [sorted(p, reverse=True) for p in (tr, stop, rep)]
    # a function of the generator's seed: the same seed, the same patients; another seed, others
    again = baselines._split_holdout(patients, idx, 0.5, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(again[:3], (tr, stop, rep)))
    other = baselines._split_holdout(patients, idx, 0.5, np.random.default_rng(8))
    assert set(patients[other[2]]) != parts[2]
    # fewer than two hold-out patients: no hold-out at all
    none = baselines._split_holdout(patients[:3], np.arange(3), 0.5, np.random.default_rng(0))
    assert none[0].tolist() == [0, 1, 2] and none[1].size == none[2].size == 0 and none[3:] == (0, 0)


def _pretrain(world: World, seed: int) -> baselines.Pretrained:
    d = baselines.pretrain_data(world.split, world.store.index, world.store.rows_for)
    cfg = PretrainConfig(max_epochs=6, lr=3e-3, batch_size=16, holdout_fraction=0.5)
    return baselines.pretrain_classifier(SPEC, 1, (SIZE, SIZE), world.store.images, d, cfg, seed)


def test_pretrained_classifier_learns_and_is_deterministic(world: World) -> None:
    a = _pretrain(world, 0)
    rep = a.report
    assert rep["n_holdout_patients"] > 0
    assert rep["n_train_images"] + rep["n_stop_images"] + rep["n_holdout_images"] == 80
    # held-out PATIENTS of the train pool, 3 classes: clearly above chance
    assert rep["holdout_balanced_acc"] > rep["holdout_chance_balanced_acc"] + 0.2, rep
    b = _pretrain(world, 0)
    for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    c = _pretrain(world, 1)
    assert not torch.equal(
        a.model.state_dict()["backbone.features.0.weight"], c.model.state_dict()["backbone.features.0.weight"]
    )
    assert a.model.head_policy == "zero"


def test_head_only_equals_engine_head_adaptation(world: World) -> None:
    """Frozen features + inner loop on the head == GradientMethod(trainable='head') on the whole net."""
    pre = _pretrain(world, 0)
    head = baselines.HeadOnlyMethod("finetune", pre.model, lr=0.05, steps=4)
    ref = GradientMethod(
        pre.model, dict(pre.model.named_parameters()), steps=4, lr=0.05, trainable="head", name="ref"
    )
    x_s, y_s, x_q, _ = world.load(world.test[0])
    p_head = head.predict_proba(head.fit(x_s, y_s, 2), x_q)
    p_ref = ref.predict_proba(ref.fit(x_s, y_s, 2), x_q)
    assert torch.allclose(p_head, p_ref, atol=1e-5)
    traj = head.fit_trajectory(x_s, y_s, 2, 4)
    assert torch.allclose(head.predict_proba(traj[4], x_q), p_head)
    assert torch.allclose(head.predict_proba(traj[0], x_q), torch.full_like(p_head, 0.5))  # zero head


def test_whole_network_and_scratch_fit_the_support_set(world: World) -> None:
    pre = _pretrain(world, 0)
    scratch = baselines.scratch_model(SPEC, 1, (SIZE, SIZE), seed=0)
    assert scratch.head_policy == "zero"
    x_s, y_s, _, _ = world.load(world.test[0])
    for model in (pre.model, scratch):
        m = baselines.whole_network_method("m", model, lr=0.03, steps=8)
        a = m.fit(x_s, y_s, 2)
        assert a.info["support_loss_after"] < a.info["support_loss_before"] - 0.05
    # a scratch model is seeded: same seed, same weights; another seed, other weights
    same = baselines.scratch_model(SPEC, 1, (SIZE, SIZE), seed=0)
    other = baselines.scratch_model(SPEC, 1, (SIZE, SIZE), seed=1)
    w = "backbone.features.0.weight"
    assert torch.equal(scratch.state_dict()[w], same.state_dict()[w])
    assert not torch.equal(scratch.state_dict()[w], other.state_dict()[w])


def test_baselines_refuse_a_learned_head(world: World) -> None:
    from pipeline.meta.models import build_model

    m = build_model(SPEC.model_copy(update={"head": "shared"}), 1, (SIZE, SIZE))  # meta-learned head
    with pytest.raises(ValueError, match="zero or proto head"):
        baselines.whole_network_method("x", m, 0.1, 2)
    with pytest.raises(ValueError, match="head_init"):
        baselines.HeadOnlyMethod("x", m, 0.1, 2, head_init="shared")


def test_a_proto_head_starts_as_nearest_prototype_and_fine_tuning_moves_it(world: World) -> None:
    """head_init=proto: before any step the head-only baseline is the nearest-prototype classifier on the
    pretrained features (so it cannot favour one class for every query), and the inner loop moves it."""
    pre = _pretrain(world, 0)
    x_s, y_s, x_q, _ = world.load(world.test[0])
    m = baselines.HeadOnlyMethod("finetune", pre.model, lr=0.05, steps=3, head_init="proto")
    traj = m.fit_trajectory(x_s, y_s, 2, 3)
    p0 = m.predict_proba(traj[0], x_q)
    f_s, f_q = pre.model.features(x_s).detach(), pre.model.features(x_q).detach()
    mu = torch.stack([f_s[y_s == c].mean(0) for c in range(2)])
    assert torch.equal(p0.argmax(1), torch.cdist(f_q, mu).argmin(1))
    # the start is exactly the linear form of the nearest-prototype rule: rows 2·mu_c, biases -||mu_c||^2
    assert traj[0].params is not None
    torch.testing.assert_close(traj[0].params["weight"], 2 * mu)
    torch.testing.assert_close(traj[0].params["bias"], -(mu * mu).sum(1))
    # the same start on the whole network (the FewShotNet proto head), scratch included
    scratch = baselines.scratch_model(SPEC, 1, (SIZE, SIZE), seed=0, head="proto")
    whole = baselines.whole_network_method("scratch", scratch, lr=0.01, steps=0)
    p_whole = whole.predict_proba(whole.fit(x_s, y_s, 2), x_q)
    f_s, f_q = scratch.features(x_s).detach(), scratch.features(x_q).detach()
    mu = torch.stack([f_s[y_s == c].mean(0) for c in range(2)])
    assert torch.equal(p_whole.argmax(1), torch.cdist(f_q, mu).argmin(1))


def test_pretraining_stops_on_held_out_patients_and_reports_the_positive_control(world: World) -> None:
    d = baselines.pretrain_data(world.split, world.store.index, world.store.rows_for)
    cfg = PretrainConfig(max_epochs=60, patience=2, lr=3e-3, batch_size=16, holdout_fraction=0.5)
    rep = baselines.pretrain_classifier(SPEC, 1, (SIZE, SIZE), world.store.images, d, cfg, 0).report
    # early stopping: it ended before the bound, `patience` epochs after its best epoch, and the curve
    # it stopped on has a minimum at that epoch
    assert rep["epochs"] < 60 and rep["stopped"].startswith("early")
    assert rep["epochs"] == rep["best_epoch"] + cfg.patience
    curve = rep["stop_loss_curve"]
    assert len(curve) == rep["epochs"] and min(curve) == curve[rep["best_epoch"] - 1]
    # the stopping and the reporting patients are disjoint halves of the hold-out
    assert rep["n_stop_patients"] > 0 and rep["n_holdout_patients"] > 0
    assert rep["n_train_images"] + rep["n_stop_images"] + rep["n_holdout_images"] == d.y.size
    # the positive control: a macro AUC per class, clearly above chance on this learnable world
    assert rep["holdout_macro_auc"] > 0.8 and rep["near_chance"] is False
    assert set(rep["holdout_auc_per_class"]) <= set(d.classes)


def test_a_classifier_that_learns_nothing_is_flagged_near_chance(world: World) -> None:
    d = baselines.pretrain_data(world.split, world.store.index, world.store.rows_for)
    rng = np.random.default_rng(0)
    shuffled = baselines.PretrainData(d.rows, rng.permutation(d.y), d.patients, d.classes, 0)
    cfg = PretrainConfig(max_epochs=4, patience=2, lr=3e-3, batch_size=16, holdout_fraction=0.5)
    rep = baselines.pretrain_classifier(SPEC, 1, (SIZE, SIZE), world.store.images, shuffled, cfg, 0).report
    assert rep["holdout_macro_auc"] < baselines.NEAR_CHANCE_AUC and rep["near_chance"] is True


def test_the_head_has_no_output_for_a_class_without_examples(world: World) -> None:
    # an n-way-only suite lists the normal label in the train pool without any single-label scan of it
    pools = {**world.split.pools, "train": {**world.split.pools["train"], "Ghost": []}}
    split = world.split.model_copy(update={"pools": pools})
    d = baselines.pretrain_data(split, world.store.index, world.store.rows_for)
    assert "Ghost" not in d.classes and sorted(set(d.y.tolist())) == list(range(len(d.classes)))
