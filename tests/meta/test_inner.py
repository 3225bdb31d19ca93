"""The one inner loop: meta-gradients against finite differences and the first-order formula, zero-step
MAML against plain training, vmap against a loop, checkpointed against plain second order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from pipeline.meta.inner import adapt, adapt_params, forward, lr_at


def tiny_mlp(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    return net


def task_data(seed: int = 1, n_s: int = 6, n_q: int = 8):
    g = torch.Generator().manual_seed(seed)
    x_s = torch.randn(n_s, 3, generator=g, dtype=torch.float64)
    x_q = torch.randn(n_q, 3, generator=g, dtype=torch.float64)
    y_s = torch.randint(0, 2, (n_s,), generator=g)
    y_q = torch.randint(0, 2, (n_q,), generator=g)
    return x_s, y_s, x_q, y_q


def meta_objective(net, params, data, steps, lr, second_order, **kw):
    x_s, y_s, x_q, y_q = data
    fast = adapt_params(net, params, x_s, y_s, steps=steps, lr=lr, second_order=second_order, **kw)
    return F.cross_entropy(forward(net, fast, x_q), y_q)


def flat_grad(loss, params):
    gs = torch.autograd.grad(loss, list(params.values()))
    return torch.cat([g.reshape(-1) for g in gs])


def test_second_order_meta_gradient_matches_finite_differences():
    net = tiny_mlp()
    data = task_data()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    g = flat_grad(meta_objective(net, params, data, steps=3, lr=0.5, second_order=True), params)

    # central differences on every coordinate (26 parameters, float64)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    shapes = [(k, p.shape, p.numel()) for k, p in params.items()]

    def f(vec):
        d, i = {}, 0
        for k, shp, n in shapes:
            d[k] = vec[i : i + n].reshape(shp)
            i += n
        with torch.enable_grad():
            return float(meta_objective(net, d, data, steps=3, lr=0.5, second_order=True))

    eps = 1e-6
    fd = torch.tensor(
        [
            (f(flat + eps * e) - f(flat - eps * e)) / (2 * eps)
            for e in torch.eye(flat.numel(), dtype=flat.dtype)
        ],
        dtype=flat.dtype,
    )
    assert torch.allclose(g, fd, rtol=1e-5, atol=1e-7), (g - fd).abs().max()
    # and the first-order gradient is really different here (the test would notice a dropped term)
    g1 = flat_grad(meta_objective(net, params, data, steps=3, lr=0.5, second_order=False), params)
    assert (g1 - fd).abs().max() > 1e-3


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_point():
    net = tiny_mlp()
    x_s, y_s, x_q, y_q = data = task_data()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    g = flat_grad(meta_objective(net, params, data, steps=2, lr=0.3, second_order=False), params)

    # reference, by hand with plain autograd: θ' = θ - α∇L_s (twice); FO-MAML gradient = ∇_θ' L_q(θ')
    theta = {k: v.detach().clone() for k, v in params.items()}
    for _ in range(2):
        t = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        ls = F.cross_entropy(torch.func.functional_call(net, t, (x_s,)), y_s)
        gs = torch.autograd.grad(ls, list(t.values()))
        theta = {k: (v - 0.3 * gi).detach() for (k, v), gi in zip(t.items(), gs)}
    t = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    want = flat_grad(F.cross_entropy(torch.func.functional_call(net, t, (x_q,)), y_q), t)
    assert torch.allclose(g, want, rtol=1e-10, atol=1e-12)


def test_zero_inner_steps_is_plain_training_on_the_query_loss():
    net = tiny_mlp()
    x_s, y_s, x_q, y_q = data = task_data()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    for so in (False, True):
        g = flat_grad(meta_objective(net, params, data, steps=0, lr=0.5, second_order=so), params)
        net.zero_grad()
        F.cross_entropy(net(x_q), y_q).backward()
        want = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        assert torch.equal(g, want)


def test_support_loss_falls_after_one_step():
    net = tiny_mlp(3)
    x_s, y_s, _, _ = task_data(4)
    params = dict(net.named_parameters())
    before = F.cross_entropy(forward(net, params, x_s), y_s)
    after = F.cross_entropy(forward(net, adapt_params(net, params, x_s, y_s, steps=1, lr=0.1), x_s), y_s)
    assert after < before - 1e-3
    # and exactly as gradient descent predicts to first order: ΔL ≈ -α‖∇L‖²
    gs = torch.autograd.grad(before, list(params.values()))
    pred = -0.1 * sum((g**2).sum() for g in gs)
    assert float((after - before).detach()) == pytest.approx(float(pred.detach()), rel=0.2)


def test_vmap_over_tasks_equals_a_loop_and_trainable_subset_is_respected():
    net = tiny_mlp()
    tasks = [task_data(s) for s in range(4)]
    xs, ys, xq, yq = (torch.stack([t[i] for t in tasks]) for i in range(4))
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    head = ("2.weight", "2.bias")

    def one(xs_, ys_, xq_, yq_):
        return meta_objective(
            net, params, (xs_, ys_, xq_, yq_), steps=2, lr=0.4, second_order=True, trainable=head
        )

    g_v = flat_grad(vmap(one)(xs, ys, xq, yq).sum(), params)
    g_l = flat_grad(sum(one(*t) for t in tasks), params)
    assert torch.allclose(g_v, g_l, rtol=1e-10, atol=1e-12)
    fast = adapt_params(net, params, xs[0], ys[0], steps=2, lr=0.4, trainable=head)
    assert torch.equal(fast["0.weight"], params["0.weight"]) and not torch.equal(
        fast["2.weight"], params["2.weight"]
    )


def test_checkpointed_second_order_equals_plain_second_order():
    net = tiny_mlp()
    data = task_data()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    lrs = [
        {k: torch.tensor(0.3 + 0.1 * i, dtype=torch.float64, requires_grad=True) for k in params}
        for i in range(3)
    ]
    every = {**params, **{f"lr{i}.{k}": v for i, d in enumerate(lrs) for k, v in d.items()}}
    g_plain = flat_grad(meta_objective(net, params, data, steps=3, lr=lrs, second_order=True), every)
    g_ckpt = flat_grad(
        meta_objective(net, params, data, steps=3, lr=lrs, second_order=True, checkpoint=True), every
    )
    assert torch.allclose(g_plain, g_ckpt, rtol=1e-10, atol=1e-12)


def test_learned_learning_rates_get_the_first_order_meta_sgd_gradient():
    # one step, first order: θ' = θ - α⊙g_s, so ∂L_q/∂α = -g_s ⊙ ∇L_q(θ')
    net = tiny_mlp()
    x_s, y_s, x_q, y_q = data = task_data()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    alpha = {k: torch.full_like(v, 0.2).requires_grad_(True) for k, v in params.items()}
    loss = meta_objective(net, params, data, steps=1, lr=alpha, second_order=False)
    g_alpha = torch.autograd.grad(loss, list(alpha.values()))
    t = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    g_s = torch.autograd.grad(
        F.cross_entropy(torch.func.functional_call(net, t, (x_s,)), y_s), list(t.values())
    )
    t2 = {k: (v - 0.2 * g).detach().requires_grad_(True) for (k, v), g in zip(params.items(), g_s)}
    g_q = torch.autograd.grad(
        F.cross_entropy(torch.func.functional_call(net, t2, (x_q,)), y_q), list(t2.values())
    )
    for ga, gs_, gq in zip(g_alpha, g_s, g_q):
        assert torch.allclose(ga, -gs_ * gq, rtol=1e-10, atol=1e-12)


def test_learning_rate_forms_and_errors():
    d = {"a": torch.tensor(0.1)}
    assert lr_at(0.5, 3, "a") == 0.5
    assert lr_at(d, 0, "a") is d["a"]
    seq = [{"a": torch.tensor(1.0)}, {"a": torch.tensor(2.0)}]
    assert float(lr_at(seq, 0, "a")) == 1.0 and float(lr_at(seq, 7, "a")) == 2.0  # past the end: last
    with pytest.raises(KeyError, match="no inner learning rate for parameter 'b'"):
        lr_at(d, 0, "b")
    net = tiny_mlp()
    x_s, y_s, _, _ = task_data()
    with pytest.raises(ValueError, match="steps must be >= 0"):
        adapt(net, dict(net.named_parameters()), x_s, y_s, steps=-1, lr=0.1)
    with pytest.raises(KeyError, match="not in params"):
        adapt(net, dict(net.named_parameters()), x_s, y_s, steps=1, lr=0.1, trainable=["nope"])
    traj = adapt(net, dict(net.named_parameters()), x_s, y_s, steps=2, lr=0.1, trajectory=True)
    assert isinstance(traj, list) and len(traj) == 3


def test_inner_gradient_clipping_bounds_every_step_and_is_off_by_default() -> None:
    """clip_grad scales each step's gradient (all trainable tensors together) to at most that norm: the
    parameter change of one step is then at most lr * clip; with a clip above the gradient norm, or none,
    the step is the plain gradient step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    params = dict(net.named_parameters())
    x, y = torch.randn(6, 3, 2, 2) * 10, torch.tensor([0, 1, 2, 0, 1, 2])
    plain = adapt(net, params, x, y, steps=1, lr=0.5)
    big = adapt(net, params, x, y, steps=1, lr=0.5, clip_grad=1e6)
    for k in params:
        assert torch.equal(plain[k], big[k])
    clipped = adapt(net, params, x, y, steps=1, lr=0.5, clip_grad=0.1)
    step = torch.sqrt(sum(((clipped[k] - params[k]) ** 2).sum() for k in params))
    full = torch.sqrt(sum(((plain[k] - params[k]) ** 2).sum() for k in params))
    assert full > 0.5 * 0.1 * 1.5  # the unclipped step really was larger
    assert step.item() == pytest.approx(0.5 * 0.1, rel=1e-4)
    # the direction is the gradient's
    for k in params:
        a, b = (clipped[k] - params[k]).flatten(), (plain[k] - params[k]).flatten()
        if b.norm() > 0:
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9999
    # second order flows through the scale
    so = adapt(net, params, x, y, steps=2, lr=0.5, clip_grad=0.1, second_order=True)
    loss = sum(v.sum() for v in so.values())
    grads = torch.autograd.grad(loss, list(params.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="clip_grad"):
        adapt(net, params, x, y, steps=1, lr=0.5, clip_grad=0.0)
