"""The method presets: what each one adapts and learns, MAML++ annealing, zero-step equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.meta.algorithms import (
    METHODS,
    InnerConfig,
    MAMLPlusPlusConfig,
    MetaLearner,
    make_algorithm,
    multi_step_weights,
)
from pipeline.meta.models import ModelSpec, build_model


def batch(t=2, n_way=3, k=2, q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(t, n_way * k, 1, 16, 16, generator=g)
    xq = torch.randn(t, n_way * q, 1, 16, 16, generator=g)
    ys = torch.arange(n_way).repeat_interleave(k).repeat(t, 1)
    yq = torch.arange(n_way).repeat_interleave(q).repeat(t, 1)
    return xs, ys, xq, yq


def learner(name, seed=0, **inner):
    torch.manual_seed(seed)
    cfg = InnerConfig(**inner)
    # the shared head: these tests check the UnicornMAML head replication (proto: its own test below)
    return MetaLearner(
        build_model(ModelSpec(filters=8, head="shared"), 1, (16, 16)), make_algorithm(name, cfg), cfg
    )


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ConfigError, match="valid: maml, fomaml, anil, metasgd, mamlpp, protonet"):
        make_algorithm("reptile", InnerConfig())


def test_every_method_trains_and_learns_only_what_it_should():
    xs, ys, xq, yq = batch()
    for name in METHODS:
        L = learner(name, steps=2, lr=0.05)
        loss, acc = L.meta_loss(xs, ys, xq, yq, 3, progress=0.0)
        assert torch.isfinite(loss) and 0 <= float(acc) <= 1
        loss.backward()
        n_lr = len(L.lr_params)
        if name == "metasgd":
            assert n_lr == len(dict(L.model.named_parameters()))  # one tensor per parameter
            assert all(p.grad is not None for p in L.lr_params.values())
        elif name == "mamlpp":
            assert n_lr == 2 * len(dict(L.model.named_parameters()))  # per layer, per step
        else:
            assert n_lr == 0
        backbone_grad = L.model.backbone.features[0].weight.grad
        assert backbone_grad is not None and backbone_grad.abs().sum() > 0, name


def test_anil_adapts_only_the_head_at_test_time():
    L = learner("anil", steps=2, lr=0.1)
    xs, ys, _, _ = batch()
    a = L.method().fit(xs[0], ys[0], 3)
    assert a.params is not None
    assert torch.equal(a.params["backbone.features.0.weight"], L.model.backbone.features[0].weight.detach())
    assert a.params["head.weight"].shape == (3, L.model.feat_dim)
    assert a.info["support_loss_after"] < a.info["support_loss_before"]


def test_maml_with_zero_inner_steps_equals_plain_training_on_the_query_loss():
    xs, ys, xq, yq = batch(t=1)
    L = learner("maml", steps=0, second_order=True)
    loss, _ = L.meta_loss(xs, ys, xq, yq, 3)
    loss.backward()
    got = {k: p.grad.clone() for k, p in L.model.named_parameters()}
    # plain training: the same network with its head replicated to 3 classes, query loss, backprop
    ref = learner("maml", steps=0)
    p = ref.model.task_params(3)
    F.cross_entropy(torch.func.functional_call(ref.model, p, (xq[0],)), yq[0]).backward()
    for k, q in ref.model.named_parameters():
        assert torch.allclose(got[k], q.grad, atol=1e-6), k


def test_vmapped_meta_batch_equals_looped_tasks():
    xs, ys, xq, yq = batch(t=3)
    grads = []
    for vm in (True, False):
        L = learner("metasgd", steps=2, lr=0.05, second_order=True, tasks="vmap" if vm else "loop")
        L.meta_loss(xs, ys, xq, yq, 3)[0].backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in L.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_multi_step_loss_weights_anneal_to_the_last_step():
    w0 = multi_step_weights(4, 0.0, 0.5)
    assert w0 == pytest.approx([0.25] * 4)
    w1 = multi_step_weights(4, 0.5, 0.5)
    assert sum(w1) == pytest.approx(1.0) and w1[0] == pytest.approx(0.03 / 4) and w1[-1] > 0.97
    assert multi_step_weights(4, 0.25, 0.5)[-1] == pytest.approx(1 - 3 * (0.5 * 0.25 + 0.5 * 0.0075))


def test_derivative_order_annealing_switches_to_second_order():
    cfg = InnerConfig(steps=2, second_order=True)
    L = MetaLearner(
        build_model(ModelSpec(filters=8), 1, (16, 16)),
        make_algorithm("mamlpp", cfg, MAMLPlusPlusConfig(derivative_order_anneal=0.4)),
        cfg,
    )
    assert not L.second_order_at(0.1) and L.second_order_at(0.4)
    assert not learner("fomaml", second_order=True).second_order_at(1.0)


def test_threaded_tasks_give_the_looped_meta_gradient_deterministically():
    xs, ys, xq, yq = batch(t=4)
    n = torch.get_num_threads()
    torch.set_num_threads(2)  # two workers even on a one-core runner
    try:
        runs = []
        for mode in ("threads", "threads", "loop"):
            L = learner("mamlpp", steps=2, lr=0.05, second_order=True, tasks=mode)
            loss, acc = L.meta_backward(xs, ys, xq, yq, 3, progress=0.9)
            runs.append((float(loss), torch.cat([p.grad.reshape(-1) for p in L.parameters()])))
            assert L.task_mode(xs.device) == mode
    finally:
        torch.set_num_threads(n)
    assert torch.get_num_threads() == n  # restored after the threaded step
    (l1, g1), (l2, g2), (l3, g3) = runs
    assert l1 == l2 and torch.equal(g1, g2)  # bit-identical reruns (resume relies on it)
    assert abs(l1 - l3) < 1e-5 and torch.allclose(g1, g3, rtol=1e-4, atol=1e-6)


def test_a_proto_head_gives_the_hand_written_meta_gradient_and_avoids_vmap_in_second_order():
    """Proto-MAML: the head starts from the support prototypes, which depend on the backbone. The looped
    meta-gradient equals a hand-written autograd one (second order, through the prototypes); first order
    under vmap agrees with the loop; second order under vmap disagreed (O(1), GroupNorm), so task_mode
    runs those tasks looped."""
    xs, ys, xq, yq = batch(t=2)

    def proto_learner(mode: str, so: bool) -> MetaLearner:
        torch.manual_seed(0)
        cfg = InnerConfig(steps=2, lr=0.05, second_order=so, tasks=mode)
        return MetaLearner(
            build_model(ModelSpec(filters=8, head="proto"), 1, (16, 16)), make_algorithm("maml", cfg), cfg
        )

    def grads(L: MetaLearner) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in L.parameters() if p.grad is not None])

    ref = proto_learner("loop", True)
    net, meta, total = ref.model, ref.model.meta_parameters(), 0.0
    for i in range(2):
        p = net.task_params(3, meta, support=(xs[i], ys[i]))
        for _ in range(2):
            loss = F.cross_entropy(torch.func.functional_call(net, p, (xs[i],)), ys[i])
            gs = torch.autograd.grad(loss, list(p.values()), create_graph=True, materialize_grads=True)
            p = {k: v - 0.05 * g for (k, v), g in zip(p.items(), gs)}
        total = total + F.cross_entropy(torch.func.functional_call(net, p, (xq[i],)), yq[i])
    (total / 2).backward()
    loop = proto_learner("loop", True)
    loop.meta_loss(xs, ys, xq, yq, 3)[0].backward()
    assert torch.allclose(grads(loop), grads(ref), atol=1e-5)
    fo = [proto_learner(m, False) for m in ("vmap", "loop")]
    for L in fo:
        L.meta_loss(xs, ys, xq, yq, 3)[0].backward()
    assert torch.allclose(grads(fo[0]), grads(fo[1]), rtol=1e-3, atol=1e-4)
    assert proto_learner("vmap", True).task_mode(torch.device("cpu")) == "loop"
    assert proto_learner("vmap", False).task_mode(torch.device("cpu")) == "vmap"
