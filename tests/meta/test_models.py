"""Models: the shared head works for any n_way, normalization lets one scan be predicted alone, 2D and 3D,
MONAI backbones with the norm policy applied, meta-model save/load round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError, DataError
from pipeline.meta.methods import FewShotMethod, GradientMethod, ProtoNetMethod
from pipeline.meta.model_io import load_meta_model, save_meta_model
from pipeline.meta.models import ModelSpec, build_model


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelSpec(**kw), 1, (16, 16))


def test_shared_head_starts_every_class_equal_and_is_differentiable_through_replication():
    m = _model(head="shared")
    x = torch.randn(3, 1, 16, 16)
    for n_way in (2, 3, 5):
        p = m.task_params(n_way)
        logits = torch.func.functional_call(m, p, (x,))
        assert logits.shape == (3, n_way)
        assert torch.allclose(logits, logits[:, :1].expand_as(logits))  # no class favoured at the start
    # the gradient reaching the shared row is the sum of the per-class rows' gradients
    p = m.task_params(4)
    y = torch.tensor([0, 1, 3])
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(m, p, (x,)), y)
    (g_shared,) = torch.autograd.grad(loss, [m.head.weight], retain_graph=True)
    p_rows = {**p, "head.weight": p["head.weight"].detach().clone().requires_grad_(True)}
    loss2 = torch.nn.functional.cross_entropy(torch.func.functional_call(m, p_rows, (x,)), y)
    (g_rows,) = torch.autograd.grad(loss2, [p_rows["head.weight"]])
    assert torch.allclose(g_shared, g_rows.sum(0, keepdim=True), atol=1e-6)


def test_zero_head_is_not_meta_learned_and_starts_at_zero():
    m = _model(head="zero")
    assert "head.weight" not in m.meta_parameters()
    p = m.task_params(3, m.meta_parameters())
    assert p["head.weight"].shape == (3, m.feat_dim) and not p["head.weight"].any()


def test_proto_head_starts_as_the_prototypical_classifier_and_carries_the_outer_gradient():
    m = _model(head="proto")
    assert "head.weight" not in m.meta_parameters()
    x_s, y_s = torch.randn(6, 1, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    x_q = torch.randn(5, 1, 16, 16)
    with pytest.raises(ValueError, match="support"):
        m.task_params(3)
    p = m.task_params(3, m.meta_parameters(), support=(x_s, y_s))
    logits = torch.func.functional_call(m, p, (x_q,))
    f_s, f_q = m.features(x_s), m.features(x_q)
    mu = torch.stack([f_s[y_s == c].mean(0) for c in range(3)])
    # logits = -||f - mu_c||^2 + ||f||^2: the ProtoNet scores up to a term every class shares
    ref = -(torch.cdist(f_q, mu) ** 2) + (f_q * f_q).sum(1, keepdim=True)
    assert torch.allclose(logits, ref, rtol=1e-4, atol=1e-3)
    assert torch.equal(logits.argmax(1), torch.cdist(f_q, mu).argmin(1))
    # invariant to the label order of the episode: permuting labels permutes the logit columns
    perm = torch.tensor([2, 0, 1])
    p2 = m.task_params(3, m.meta_parameters(), support=(x_s, perm[y_s]))
    logits2 = torch.func.functional_call(m, p2, (x_q,))
    assert torch.allclose(logits2[:, perm], logits, rtol=1e-5, atol=1e-4)
    # the query loss reaches the backbone through the prototypes
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1]))
    g = torch.autograd.grad(loss, [m.backbone.features[0].weight])[0]
    assert g.abs().sum() > 0


@pytest.mark.parametrize("norm", ["group", "instance", "layer", "none"])
def test_a_single_scan_is_predicted_the_same_alone_or_in_a_batch(norm):
    m = _model(norm=norm)
    x = torch.randn(6, 1, 16, 16)
    meth = GradientMethod(m, steps=2, lr=0.05)
    a = meth.fit(x, torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    batch = meth.predict_proba(a, x)
    alone = meth.predict_proba(a, x[2:3])
    assert torch.allclose(batch[2:3], alone, atol=1e-6)
    assert torch.allclose(batch.sum(1), torch.ones(6), atol=1e-6)


def test_batch_transductive_norm_depends_on_the_batch_as_documented():
    m = _model(norm="batch_transductive")
    x = torch.randn(6, 1, 16, 16)
    assert not any(isinstance(b, torch.Tensor) and b.numel() for b in m.buffers())  # no running stats
    out_b = m.backbone(x)[2]
    out_a = m.backbone(x[2:3])[0]
    assert not torch.allclose(out_b, out_a, atol=1e-4)


def test_conv4_3d_and_flatten_sizes():
    m = build_model(ModelSpec(filters=8), 2, (16, 16, 16))
    assert m.feat_dim == 8  # 16 → 1 after four poolings
    assert m(torch.randn(2, 2, 16, 16, 16)).shape == (2, 1)
    m2 = build_model(ModelSpec(filters=8), 1, (64, 64))
    assert m2.feat_dim == 8 * 4 * 4
    with pytest.raises(ConfigError, match="too small"):
        build_model(ModelSpec(), 1, (8, 8))


def test_monai_backbone_by_name_with_options_and_norm_policy():
    spec = ModelSpec(
        backbone="DenseNet121",
        embed_dim=16,
        options={"init_features": 8, "growth_rate": 4, "block_config": [2, 2]},
    )
    m = build_model(spec, 1, (16, 16))
    assert m.feat_dim == 16
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    assert any(isinstance(mod, nn.GroupNorm) for mod in m.modules())
    x = torch.randn(4, 1, 16, 16)
    a = GradientMethod(m, steps=1, lr=0.01).fit(x, torch.tensor([0, 1, 0, 1]), 2)
    assert a.info["support_loss_after"] < a.info["support_loss_before"]
    with pytest.raises(ConfigError, match="unknown backbone 'NoSuchNet'"):
        build_model(ModelSpec(backbone="NoSuchNet"), 1, (16, 16))
    with pytest.raises(ConfigError, match="has no option"):
        build_model(ModelSpec(backbone="DenseNet121", options={"bogus": 1}), 1, (16, 16))


def test_fit_works_for_any_n_way_and_checks_labels():
    m = _model()
    for method in (GradientMethod(m, steps=1, lr=0.01), ProtoNetMethod(m)):
        assert isinstance(method, FewShotMethod)
        for n_way in (2, 4):
            x = torch.randn(2 * n_way, 1, 16, 16)
            y = torch.arange(n_way).repeat(2)
            proba = method.predict_proba(method.fit(x, y, n_way), x)
            assert proba.shape == (2 * n_way, n_way)
            # a probability per class for every scan: non-negative rows summing to one
            assert bool((proba >= 0).all())
            torch.testing.assert_close(proba.sum(1), torch.ones(2 * n_way), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="labels must lie in"):
            method.fit(torch.randn(2, 1, 16, 16), torch.tensor([0, 5]), 2)


def test_protonet_classifies_well_separated_support_perfectly():
    m = _model(norm="none")
    x = torch.randn(2, 1, 16, 16).repeat_interleave(3, 0) + 0.01 * torch.randn(6, 1, 16, 16)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    meth = ProtoNetMethod(m)
    a = meth.fit(x, y, 2)
    assert a.prototypes is not None and a.prototypes.shape == (2, m.feat_dim)
    assert torch.equal(meth.predict_proba(a, x).argmax(1), y)


def test_meta_model_round_trip_reproduces_predictions_and_learned_rates(tmp_path):
    m = _model(3, head="shared")  # a meta-learned head, with its learned rates
    lr = [{k: torch.tensor(0.01 * (i + 1)) for k in m.meta_parameters()} for i in range(2)]
    save_meta_model(
        tmp_path / "maml",
        m,
        method="mamlpp",
        model_spec=ModelSpec(head="shared"),
        image_shape=(1, 16, 16),
        inner={"steps": 2, "lr": 0.01, "eval_steps": 4, "trainable": "all"},
        inner_lr=lr,
        extra={"ingest_run_id": "r1", "preprocessing": {"size": [16, 16]}},
    )
    mm = load_meta_model(tmp_path / "maml")
    assert mm.meta.ingest_run_id == "r1" and mm.meta.normalization == "group" and mm.meta.head == "shared"
    assert isinstance(mm.inner_lr, list) and float(mm.inner_lr[1]["head.bias"]) == pytest.approx(0.02)
    x = torch.randn(4, 1, 16, 16)
    y = torch.tensor([0, 1, 0, 1])
    ref = GradientMethod(m, steps=4, lr=lr)
    got = mm.method()
    assert isinstance(got, GradientMethod) and got.steps == 4
    assert torch.allclose(
        ref.predict_proba(ref.fit(x, y, 2), x), got.predict_proba(got.fit(x, y, 2), x), atol=1e-6
    )
    with pytest.raises(DataError, match="not a meta-model folder"):
        load_meta_model(tmp_path)


def test_fit_trajectory_is_one_run_ending_at_fit() -> None:
    """The trajectory's states are successive inner steps; its last state is exactly `fit`'s result."""
    import torch as _t

    from pipeline.meta.methods import GradientMethod
    from pipeline.meta.models import ModelSpec, build_model

    _t.manual_seed(0)
    model = build_model(ModelSpec(filters=4, blocks=2), in_channels=1, image_size=(8, 8))
    m = GradientMethod(model, steps=3, lr=0.1)
    x, y = _t.randn(6, 1, 8, 8), _t.tensor([0, 0, 0, 1, 1, 1])
    traj = m.fit_trajectory(x, y, 2, 3)
    assert len(traj) == 4
    fitted = m.fit(x, y, 2)
    for k, v in fitted.params.items():
        _t.testing.assert_close(traj[-1].params[k], v)
    losses = [
        float(_t.nn.functional.cross_entropy(m.predict_proba(s, x).log(), y, reduction="mean")) for s in traj
    ]
    assert losses[-1] < losses[0]
    assert any(not _t.equal(traj[0].params[k], traj[1].params[k]) for k in traj[0].params)
