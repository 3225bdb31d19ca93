"""The CPU fast paths (GroupNorm2, max_pool2, Conv2d2, MaxPoolReLU2) compute what the stock PyTorch ops compute.

The compiled kernels behind them are tested on their own in test_native.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from pipeline.meta import fastops
from pipeline.meta.fastops import Conv2d2, GroupNorm2, MaxPoolReLU2, max_pool2


def _pair(groups: int, channels: int) -> tuple[nn.GroupNorm, nn.GroupNorm]:
    fast, ref = GroupNorm2(groups, channels).double(), nn.GroupNorm(groups, channels).double()
    with torch.no_grad():
        fast.weight.normal_()
        fast.bias.normal_()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize(
    "shape,groups",
    [((3, 4, 5, 5), 2), ((2, 6, 3, 3, 3), 3), ((2, 4, 7), 4), ((2, 4, 3, 3), 1)],
    ids=["group-2d", "group-3d", "instance-1d", "layer-2d"],
)
def test_group_norm2_matches_group_norm_to_second_order(shape, groups):
    torch.manual_seed(0)
    fast, ref = _pair(groups, shape[1])
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(fast(x), ref(x), atol=1e-12)

    # first derivatives equal the stock op's, and the analytic second derivative passes gradgradcheck
    gy = torch.randn(*shape, dtype=torch.float64)
    g_fast = torch.autograd.grad(fast(x), (x, fast.weight, fast.bias), gy)
    g_ref = torch.autograd.grad(ref(x), (x, ref.weight, ref.bias), gy)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-10)
    w = fast.weight.detach().clone().requires_grad_()
    b = fast.bias.detach().clone().requires_grad_()

    def f(x_, w_, b_):
        return functional_call(fast, {"weight": w_, "bias": b_}, (x_,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_group_norm2_second_derivative_equals_the_stock_composite():
    """Hessian-vector products through GroupNorm2 equal those through nn.GroupNorm (float64)."""
    torch.manual_seed(1)
    fast, ref = _pair(2, 6)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 6, 4, 4, dtype=torch.float64)

    def hvp(mod: nn.Module) -> list[torch.Tensor]:
        loss = (mod(x) ** 3).sum()
        gx, gw = torch.autograd.grad(loss, (x, mod.weight), create_graph=True)
        return list(torch.autograd.grad((gx * v).sum() + gw.sum(), (x, mod.weight, mod.bias)))

    for a, b in zip(hvp(fast), hvp(ref)):
        assert torch.allclose(a, b, atol=1e-9), (a - b).abs().max()


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 5, 7, 7), (3, 2, 5, 6), (1, 1, 3, 3)])
def test_max_pool2_matches_max_pool2d_including_ties_and_odd_sizes(shape):
    torch.manual_seed(0)
    # integer-valued inputs make most windows contain ties: the gradient must go where ATen sends it
    for x0 in (torch.randn(*shape), torch.randint(0, 2, shape).float(), torch.zeros(shape)):
        x = x0.clone().requires_grad_(True)
        xr = x0.clone().requires_grad_(True)
        y, yr = max_pool2(x), F.max_pool2d(xr, 2)
        assert torch.equal(y, yr)
        gy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, gy, create_graph=True)
        (gxr,) = torch.autograd.grad(yr, xr, gy.clone().requires_grad_(), create_graph=True)
        assert torch.equal(gx, gxr)


def test_max_pool2_double_backward_and_3d():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(max_pool2, (x,))
    assert torch.autograd.gradgradcheck(max_pool2, (x,))
    x3 = torch.randn(2, 3, 4, 4, 4)
    assert torch.equal(max_pool2(x3), F.max_pool3d(x3, 2))


def test_fast_paths_defer_to_the_stock_ops_under_vmap():
    torch.manual_seed(0)
    fast, ref = _pair(2, 4)
    xs = torch.randn(3, 2, 4, 6, 6, dtype=torch.float64)  # 3 "tasks"
    assert torch.allclose(vmap(fast)(xs), torch.stack([ref(x) for x in xs]), atol=1e-12)
    assert torch.equal(vmap(max_pool2)(xs), torch.stack([F.max_pool2d(x, 2) for x in xs]))


def test_forward_mode_ad_takes_the_stock_ops():
    """jvp (torch.func and torch.autograd.forward_ad) works through the fast modules: they defer to the
    stock ops, whose forward-mode formulas exist."""
    from torch.func import jvp

    torch.manual_seed(0)
    fast, ref = _pair(2, 4)
    x, v = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert torch.allclose(jvp(fast, (x,), (v,))[1], jvp(ref, (x,), (v,))[1], atol=1e-12)
    assert torch.equal(jvp(max_pool2, (x,), (v,))[1], jvp(lambda t: F.max_pool2d(t, 2), (x,), (v,))[1])


def test_maml_meta_gradient_through_the_fast_network_equals_the_stock_network():
    """Second-order MAML (torch.func.grad inner loop, autograd outer) through conv -> norm -> pool+ReLU
    with the fast ops (Conv2d2, GroupNorm2, MaxPoolReLU2) equals the stock conv -> GroupNorm -> ReLU ->
    MaxPool2d network (float64)."""
    torch.manual_seed(0)

    def net(fast: bool) -> nn.Sequential:
        conv = Conv2d2(1, 4, 3, padding=1) if fast else nn.Conv2d(1, 4, 3, padding=1)
        norm = GroupNorm2(2, 4) if fast else nn.GroupNorm(2, 4)
        tail = [MaxPoolReLU2(), nn.Identity()] if fast else [nn.ReLU(), nn.MaxPool2d(2)]
        return nn.Sequential(conv, norm, *tail, nn.Flatten(), nn.Linear(64, 3)).double()

    a, b = net(True), net(False)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(6, 1, 9, 9, dtype=torch.float64), torch.randint(0, 3, (6,))
    xq, yq = torch.randn(10, 1, 9, 9, dtype=torch.float64), torch.randint(0, 3, (10,))

    def meta_grad(m: nn.Module) -> tuple[torch.Tensor, ...]:
        p = dict(m.named_parameters())
        for _ in range(3):
            g = grad(lambda q: F.cross_entropy(functional_call(m, q, (x,)), y))(p)
            p = {k: p[k] - 0.3 * g[k] for k in p}
        return torch.autograd.grad(F.cross_entropy(functional_call(m, p, (xq,)), yq), list(m.parameters()))

    for ga, gb in zip(meta_grad(a), meta_grad(b)):
        assert torch.allclose(ga, gb, atol=1e-11), (ga - gb).abs().max()


def test_the_private_apply_entry_point_is_used_only_when_it_behaves_as_the_public_one():
    """fastops applies its Functions through torch's private C entry point only if an import-time probe
    found it present and equal in effect to the public Function.apply; a missing one (None), one that
    raises, or one that skips autograd leaves every Function on the public path, which gives the same
    values and gradients."""

    def raises(*args):
        raise TypeError("changed signature")

    no_graph = classmethod(lambda cls, *args: cls.forward(*args))  # runs forward, records nothing
    assert fastops._checked_c_apply(None) is None
    assert fastops._checked_c_apply(raises) is None
    assert fastops._checked_c_apply(no_graph) is None
    assert fastops._fast_apply(fastops._GroupNorm, None) == fastops._GroupNorm.apply

    torch.manual_seed(0)
    fast, _ = _pair(2, 4)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for c_apply in (fastops._C_APPLY, None):  # the checked fast path (where torch has it), the public one
        y = fastops._fast_apply(fastops._GroupNorm, c_apply)(x, fast.weight, fast.bias, 2, fast.eps)[0]
        assert type(y.grad_fn).__name__ == "_GroupNormBackward"
        results.append([y, *torch.autograd.grad((y**2).sum(), (x, fast.weight))])
    for a, b in zip(*results):
        assert torch.equal(a, b)
