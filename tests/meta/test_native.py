"""The compiled CPU kernels (pipeline/meta/native.py, csrc/) and the fast paths that use them compute what the
stock PyTorch ops compute; without a compiler everything still works, through the pure-torch paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from pipeline.meta import fastops, native
from pipeline.meta.fastops import Conv2d2, GroupNorm2, MaxPoolReLU2, pool2_relu

ROOT = Path(__file__).resolve().parents[2]
needs_kernels = pytest.mark.skipif(native.lib() is None, reason=f"CPU kernels: {native.status()}")


def _reference_pool_relu(x: torch.Tensor) -> torch.Tensor:
    """The textbook order: ReLU, then 2x2 max-pool."""
    return F.max_pool2d(F.relu(x), 2)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.randn(*shape, generator=g, dtype=dtype)
    flat = special.view(-1)
    flat[::7] = float("nan")
    flat[3::11] = float("-inf")
    flat[5::13] = float("inf")
    flat[2::17] = -0.0
    return [
        torch.randn(*shape, generator=g, dtype=dtype),
        torch.randint(-1, 2, shape, generator=g).to(dtype),  # ties in most windows
        torch.zeros(shape, dtype=dtype),
        -torch.rand(*shape, generator=g, dtype=dtype),  # every window blocked by the ReLU
        special,
    ]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(4, 3, 8, 8), (2, 5, 7, 7), (3, 2, 5, 6), (1, 1, 3, 3), (2, 3, 4, 40), (1, 2, 2, 35)]
)
def test_pool_relu_kernel_equals_relu_then_max_pool(shape, dtype):
    """Values and gradient routing (ties, NaN, ±inf, -0, odd sizes, rows longer than one SIMD step) equal the
    stock ReLU -> max_pool2d, and so does the derivative of the backward (second order)."""
    for x0 in _inputs(shape, dtype):
        x, xr = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        y = fastops._apply_PoolReLU(x)[0]  # the kernel itself, whatever the dtype gating of pool2_relu
        yr = _reference_pool_relu(xr)
        torch.testing.assert_close(y, yr, rtol=0, atol=0, equal_nan=True)
        gy = torch.randn_like(y).requires_grad_(True)
        (gx,) = torch.autograd.grad(y, x, gy, create_graph=True)
        (gxr,) = torch.autograd.grad(yr, xr, gy, create_graph=True)
        torch.testing.assert_close(gx, gxr, rtol=0, atol=0, equal_nan=True)
        v = torch.randn_like(gx)
        (ggy,) = torch.autograd.grad(gx, gy, v)
        (ggyr,) = torch.autograd.grad(gxr, gy, v)
        torch.testing.assert_close(ggy, ggyr, rtol=0, atol=0, equal_nan=True)


@needs_kernels
def test_pool_relu_gradcheck_and_module_and_3d():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pool2_relu, (x,))
    assert torch.autograd.gradgradcheck(pool2_relu, (x,))
    assert torch.equal(MaxPoolReLU2()(x), _reference_pool_relu(x))
    x3 = torch.randn(2, 3, 4, 4, 4)
    assert torch.equal(pool2_relu(x3), F.max_pool3d(F.relu(x3), 2))


def _gn_pair(groups: int, channels: int, dtype: torch.dtype) -> tuple[GroupNorm2, nn.GroupNorm]:
    torch.manual_seed(groups * 100 + channels)
    fast = GroupNorm2(groups, channels).to(dtype)
    with torch.no_grad():
        fast.weight.normal_()
        fast.bias.normal_()
    ref = nn.GroupNorm(groups, channels).to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize(
    "shape,groups", [((3, 8, 5, 5), 2), ((2, 6, 3, 3, 3), 3), ((5, 64, 14, 14), 8), ((2, 4, 3, 1), 4)]
)
@pytest.mark.parametrize("terms", ["x", "w", "b", "xw", "xwb"])
def test_gn_double_backward_kernel_equals_stock_group_norm(shape, groups, dtype, tol, terms):
    """Each combination of incoming second-order directions (into gx, gweight, gbias; the others None)
    gives the Hessian-vector products of the stock nn.GroupNorm composite (computed in float64)."""
    fast, ref = _gn_pair(groups, shape[1], dtype)
    ref = ref.double()
    x0 = torch.randn(*shape, dtype=torch.float64)
    v = torch.randn(*shape, dtype=torch.float64)
    u, t = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)

    def hvp(mod: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.clone().requires_grad_(True)
        gx, gw, gb = torch.autograd.grad((mod(x) ** 3).sum(), (x, mod.weight, mod.bias), create_graph=True)
        dt = gx.dtype
        total = sum(
            (
                (gx * v.to(dt)).sum() if "x" in terms else 0,
                (gw * u.to(dt)).sum() if "w" in terms else 0,
                (gb * t.to(dt)).sum() if "b" in terms else 0,
            )
        )
        return list(torch.autograd.grad(total, (x, mod.weight, mod.bias), allow_unused=True))

    def rel(a: torch.Tensor | None, b: torch.Tensor) -> float:
        assert a is not None
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    # in float32 the bar is the stock op's own float32 error (small groups are ill-conditioned)
    ref_lo = nn.GroupNorm(groups, shape[1]).to(dtype)
    ref_lo.load_state_dict(fast.state_dict())
    stock = hvp(ref_lo, x0.to(dtype))
    for a, b, s in zip(hvp(fast, x0.to(dtype)), hvp(ref, x0), stock):
        if b is None:
            assert a is None or not a.any()
            continue
        assert rel(a, b) < max(tol, 2 * rel(s, b)), (rel(a, b), rel(s, b))


@needs_kernels
def test_gn_kernel_equals_the_torch_composite_it_replaces(monkeypatch):
    """The C double backward and fastops' own torch formulas (used where the kernels are unavailable)
    agree in float32: both are the same derivation."""
    fast, _ = _gn_pair(8, 64, torch.float32)
    x = torch.randn(5, 64, 7, 7, requires_grad=True)
    v = torch.randn(5, 64, 7, 7)

    def hvp() -> list[torch.Tensor]:
        gx, gw = torch.autograd.grad((fast(x) ** 2).sum(), (x, fast.weight), create_graph=True)
        return list(torch.autograd.grad((gx * v).sum() + gw.sum(), (x, fast.weight, fast.bias)))

    with_kernel = hvp()
    monkeypatch.setattr(native, "usable", lambda *t: False)
    without = hvp()
    for a, b in zip(with_kernel, without):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cin,bias", [(1, True), (3, False), (4, True)])  # 4·3·3 = 36 > 32: F.conv2d inside
def test_fixed_input_conv_equals_conv2d_to_second_order(cin, bias):
    """Conv2d2 on an input that needs no gradient (the images) gives the values, gradients and Hessian-
    vector products of nn.Conv2d (float64), and passes gradgradcheck."""
    torch.manual_seed(cin)
    fast = Conv2d2(cin, 6, 3, padding=1, bias=bias).double()
    ref = nn.Conv2d(cin, 6, 3, padding=1, bias=bias).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(4, cin, 9, 8, dtype=torch.float64)
    assert torch.allclose(fast(x), ref(x), atol=1e-12)
    v = torch.randn(4, 6, 9, 8, dtype=torch.float64)

    def hvp(mod: nn.Module) -> list[torch.Tensor]:
        params = list(mod.parameters())
        gs = torch.autograd.grad((mod(x).tanh() * v).sum(), params, create_graph=True)
        return list(torch.autograd.grad(sum((g**2).sum() for g in gs), params))

    for a, b in zip(hvp(fast), hvp(ref)):
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()
    names = [n for n, _ in fast.named_parameters()]
    ps = tuple(p.detach().clone().requires_grad_(True) for p in fast.parameters())
    # Full (slow-mode) Jacobians on a 2x5x4 corner of the images: what they check does not depend on the
    # size (the im2col path for cin 1 and 3, F.conv2d for cin 4, padding, a non-square image), their cost
    # grows with the number of outputs (the full 4x9x8 batch: 20 to 300 s per case)
    xs = x[:2, :, :5, :4]

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(fast, dict(zip(names, ps)), (xs,))

    assert torch.autograd.gradcheck(f, ps)
    assert torch.autograd.gradgradcheck(f, ps)
    # an input that needs a gradient takes the stock op, with its input gradient
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(fast(xg).sum(), xg)
    (gxr,) = torch.autograd.grad(ref(xg).sum(), xg)
    assert torch.allclose(gx, gxr, atol=1e-12)


def test_fast_modules_under_vmap_and_torch_func_grad():
    """Under vmap the fast modules defer to the stock ops; under torch.func.grad they keep working (the
    Functions go through the public apply)."""
    torch.manual_seed(0)
    conv, ref = Conv2d2(1, 4, 3, padding=1).double(), nn.Conv2d(1, 4, 3, padding=1).double()
    ref.load_state_dict(conv.state_dict())
    xs = torch.randn(3, 2, 1, 6, 6, dtype=torch.float64)
    assert torch.allclose(vmap(conv)(xs), torch.stack([ref(x) for x in xs]), atol=1e-12)
    h = torch.randn(3, 2, 4, 6, 6, dtype=torch.float64)
    assert torch.equal(vmap(pool2_relu)(h), torch.stack([_reference_pool_relu(t) for t in h]))

    def loss(p: dict[str, torch.Tensor], mod: nn.Module) -> torch.Tensor:
        return (pool2_relu(functional_call(mod, p, (xs[0],))) ** 2).sum()

    g_fast = grad(loss)(dict(conv.named_parameters()), conv)
    g_ref = grad(loss)(dict(ref.named_parameters()), ref)
    for k in g_fast:
        assert torch.allclose(g_fast[k], g_ref[k], atol=1e-12)


@needs_kernels
def test_kernels_run_concurrently_from_task_threads():
    """ctypes releases the GIL: the engine's task threads call the kernels at once; results equal serial."""
    torch.manual_seed(0)
    xs = [torch.randn(3, 8, 28, 28) for _ in range(8)]
    serial = [pool2_relu(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(pool2_relu, xs))
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)


def test_conv4_keeps_its_state_dict_keys():
    """The fused pool+ReLU module and its Identity placeholder keep the keys of earlier saved models."""
    from pipeline.meta.models import Conv4

    keys = list(Conv4(1, (28, 28), filters=8, blocks=4).state_dict())
    expected = [f"features.{4 * b + i}.{p}" for b in range(4) for i in (0, 1) for p in ("weight", "bias")]
    assert keys == expected


_CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from pipeline.meta import native
        status = native.status()
    from pipeline.meta.models import Conv4

    torch.manual_seed(0)
    net = Conv4(1, (12, 12), filters=8, blocks=2).double()
    head = torch.nn.Linear(net.feat_dim, 3).double()
    x, y = torch.randn(6, 1, 12, 12, dtype=torch.float64), torch.arange(3).repeat(2)
    p = dict(net.named_parameters())
    for _ in range(2):  # second-order MAML through conv -> GroupNorm -> pool+ReLU
        loss = F.cross_entropy(head(functional_call(net, p, (x,))), y)
        g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        p = {k: v - 0.3 * gi for (k, v), gi in zip(p.items(), g)}
    meta = torch.autograd.grad(F.cross_entropy(head(functional_call(net, p, (x,))), y), list(net.parameters()))
    print(json.dumps({"status": status, "warnings": [str(w.message) for w in caught],
                      "grad": [t.flatten().tolist() for t in meta]}))
    """
)


def _child(env_extra: dict[str, str], tmp_path: Path) -> dict:
    inherited = {k: v for k, v in os.environ.items() if k != "FEWSCAN_NATIVE"}  # the CI lane without kernels
    env = {**inherited, "FEWSCAN_NATIVE_CACHE": str(tmp_path / "cache"), **env_extra}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_a_compiler_the_pure_torch_paths_give_the_same_meta_gradient(tmp_path):
    """No compiler (CC points nowhere): one clear warning, status 'unavailable: ...', and the second-order
    meta-gradient equals the one computed with the kernels (float64); FEWSCAN_NATIVE=0 disables quietly."""
    broken = _child({"CC": str(tmp_path / "no-such-cc")}, tmp_path / "a")
    assert broken["status"].startswith("unavailable:"), broken["status"]
    assert len(broken["warnings"]) == 1 and "could not be built" in broken["warnings"][0]
    off = _child({"FEWSCAN_NATIVE": "0"}, tmp_path / "b")
    assert off["status"] == "disabled by FEWSCAN_NATIVE=0" and off["warnings"] == []
    if native.lib() is None:
        pytest.skip(f"no kernels to compare with here: {native.status()}")
    on = _child({}, tmp_path / "c")
    assert on["status"] == "loaded"
    assert (tmp_path / "c" / "cache").is_dir()  # built into the cache it was pointed at
    for a, b, c in zip(on["grad"], off["grad"], broken["grad"]):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-12)
        assert torch.equal(torch.tensor(b), torch.tensor(c))


@needs_kernels
def test_portable_kernels_without_avx512(tmp_path):
    """Built for a baseline x86-64 (no AVX-512), the kernels pass the self-check ("loaded") and the portable
    C pool kernels are exact too; float32 then keeps the torch pool and GroupNorm block (faster than the
    portable kernel on short rows). The whole file passes with FEWSCAN_NATIVE_ARCH=-march=x86-64 too."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 only")
    code = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from pipeline.meta import native, fastops
        assert native.status() == "loaded" and not native.pool_simd()
        for dtype in (torch.float32, torch.float64):
            for x0 in (torch.randn(3, 4, 7, 40, dtype=dtype), torch.randint(-1, 2, (2, 3, 6, 6)).to(dtype)):
                x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
                y = fastops._apply_PoolReLU(x)[0]
                yr = F.max_pool2d(F.relu(xr), 2)
                assert torch.equal(y, yr)
                gy = torch.randn_like(y)
                assert torch.equal(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(yr, xr, gy)[0])
        x = torch.randn(2, 3, 8, 8)
        assert fastops.pool2_relu(x.requires_grad_()).grad_fn.name() != "_PoolReLUBackward"
        y = fastops.group_norm_pool_relu(x, fastops.GroupNorm2(1, 3))
        assert y.grad_fn.name() != "_GNPoolReLUBackward"
        print("ok")
        """
    )
    env = {**os.environ, "FEWSCAN_NATIVE_CACHE": str(tmp_path), "FEWSCAN_NATIVE_ARCH": "-march=x86-64"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "shape,groups", [((3, 8, 8, 8), 2), ((2, 6, 7, 7), 3), ((2, 4, 5, 6), 4), ((75, 16, 28, 28), 8)]
)
def test_fused_group_norm_pool_relu_equals_the_stock_block(shape, groups, dtype, tol):
    """The fused kernels (_GNPoolReLU) against nn.GroupNorm -> ReLU -> max_pool2d: values, the first-order
    gradients (fused backward kernel) and Hessian-vector products (the create_graph path); and
    group_norm_pool_relu takes them exactly where fastops says (float64, or float32 with the AVX-512 pool)."""
    fast, ref = _gn_pair(groups, shape[1], dtype)
    x0 = torch.randn(*shape, dtype=dtype) * 3 + 1

    def block(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if mod is fast:  # the kernels themselves, whatever the float32 gating of group_norm_pool_relu
            return fastops._apply_GNPoolReLU(x, mod.weight, mod.bias, mod.num_groups, mod.eps)[0]
        return _reference_pool_relu(mod(x))

    x, xr = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    y, yr = block(fast, x), block(ref, xr)
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    chosen = fastops.group_norm_pool_relu(x0, fast)
    fused = dtype == torch.float64 or native.pool_simd()
    assert (chosen.grad_fn.name() == "_GNPoolReLUBackward") == fused, chosen.grad_fn.name()
    torch.testing.assert_close(chosen, yr, rtol=tol, atol=tol)
    gy = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, (x, fast.weight, fast.bias), gy),
        torch.autograd.grad(yr, (xr, ref.weight, ref.bias), gy),
    ):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
    v = torch.randn_like(x0)

    def hvp(mod: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        gx, gw = torch.autograd.grad((block(mod, x) ** 2).sum(), (x, mod.weight), create_graph=True)
        return list(torch.autograd.grad((gx * v).sum() + (gw**2).sum(), (x, mod.weight, mod.bias)))

    for a, b in zip(hvp(fast, x), hvp(ref, xr)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@needs_kernels
def test_fused_group_norm_pool_relu_gradcheck():
    fast, _ = _gn_pair(2, 4, torch.float64)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    w, b = fast.weight.detach().clone().requires_grad_(), fast.bias.detach().clone().requires_grad_()

    def f(x_: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        return fastops._apply_GNPoolReLU(x_, w_, b_, 2, fast.eps)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@needs_kernels
def test_a_damaged_cached_library_is_rebuilt(tmp_path: Path) -> None:
    """A truncated library in the cache (a full disk, a killed copy) is rebuilt, not a permanent fallback."""
    code = "from pipeline.meta import native; print(native.status())"
    env = {**os.environ, "FEWSCAN_NATIVE_CACHE": str(tmp_path)}

    def status() -> str:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert status() == "loaded"
    (lib,) = tmp_path.glob("libfewscan_fastops-*.so")
    lib.write_bytes(lib.read_bytes()[:100])
    assert status() == "loaded"
    assert lib.stat().st_size > 1000 and not list(tmp_path.glob(".build-*"))


_KERNELS = [
    f"{name}_{suf}"
    for suf in ("f32", "f64")
    for name in (
        "pool2_relu_fwd",
        "pool2_relu_bwd",
        "pool2_relu_gather",
        "gn_pool_relu_fwd",
        "gn_pool_relu_bwd",
        "gn_double_backward",
    )
]


@needs_kernels
@pytest.mark.parametrize("kernel", _KERNELS)
def test_a_kernel_that_disagrees_with_the_stock_op_is_not_used(kernel, monkeypatch):
    """The self-check sees each kernel's result (here one is made wrong by 1e-3 relative in float32, 1e-9
    in float64: rounding-sized for neither): the kernels are then not used at all, with one warning line
    naming the kernel; status and build_id say so, and the fast paths take the pure-torch ops."""

    def corrupt(name: str, outputs: dict[str, torch.Tensor]) -> None:
        if name == kernel:
            for t in outputs.values():
                t.mul_(1 + (1e-3 if name.endswith("f32") else 1e-9))

    monkeypatch.setattr(native, "_state", {})  # a fresh process, as far as native is concerned
    monkeypatch.setattr(native, "_self_check_hook", corrupt)
    with pytest.warns(RuntimeWarning) as caught:
        assert native.lib() is None
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and kernel in message and "pure-torch" in message, message
    assert native.status().startswith(f"failed self-check: {kernel} "), native.status()
    assert native.build_id() == "torch"
    fast, ref = _gn_pair(2, 4, torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert not native.usable(x)
    y = fastops.group_norm_pool_relu(x, fast)
    assert y.grad_fn.name() != "_GNPoolReLUBackward"
    torch.testing.assert_close(y, _reference_pool_relu(ref(x)))


@needs_kernels
def test_the_self_check_passes_whatever_the_callers_autograd_state(monkeypatch):
    """The kernels may first be needed inside inference mode, no_grad, a torch.func transform or a backward
    pass: the check runs in its own thread, so it passes there as well, and leaves the global RNG alone."""
    for context in (torch.inference_mode, torch.no_grad):
        monkeypatch.setattr(native, "_state", {})
        state = torch.get_rng_state()
        with context():
            assert native.lib() is not None, native.status()
        assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setattr(native, "_state", {})

    def f(x: torch.Tensor) -> torch.Tensor:
        assert native.lib() is not None, native.status()
        return (x**2).sum()

    grad(f)(torch.randn(3))
    assert native.status() == "loaded"

    class Twice(torch.autograd.Function):  # GroupNorm2's double backward is a first use inside a backward
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, gy):
            assert native.lib() is not None, native.status()
            return gy * 2

    monkeypatch.setattr(native, "_state", {})
    x = torch.randn(3, requires_grad=True)
    (gx,) = torch.autograd.grad(Twice.apply(x).sum(), x)
    assert torch.equal(gx, torch.full((3,), 2.0)) and native.status() == "loaded"


_RACER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from pipeline.meta import native
    sync = Path(sys.argv[1])
    (sync / f"ready-{sys.argv[2]}").touch()
    while not (sync / "go").exists():
        time.sleep(0.01)
    print(json.dumps([native.status(), native.build_id()]))
    """
)


@needs_kernels
def test_concurrent_first_builds_compile_once(tmp_path):
    """Processes that start together on an empty cache (torchrun ranks, CI workers): the file lock lets
    one compile (a compiler wrapper counts the calls and takes 2 s more, so that every process would
    otherwise find no library and build its own), the others wait; all load the kernels, and the cache
    holds exactly one library and no temporary file."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    log, sync, cache = tmp_path / "cc.log", tmp_path / "sync", tmp_path / "cache"
    sync.mkdir()
    wrapper = tmp_path / "slow-cc"
    wrapper.write_text(f'#!/bin/sh\necho call >> "{log}"\nsleep 2\nexec "{cc}" "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "FEWSCAN_NATIVE_CACHE": str(cache), "CC": str(wrapper)}
    n = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(sync), str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        deadline = time.monotonic() + 240
        while len(list(sync.glob("ready-*"))) < n and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        (sync / "go").touch()  # all at once
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert all(status == "loaded" for status, _ in reports), reports
    assert len({key for _, key in reports}) == 1 and reports[0][1].startswith("native-")
    assert log.read_text().splitlines() == ["call"]  # one compile
    assert len(list(cache.glob("libfewscan_fastops-*.so"))) == 1
    assert not list(cache.glob(".build-*"))


_FAST_MATH_CHILD = textwrap.dedent(
    """
    import json, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from pipeline.meta import fastops, native
        status = native.status()
    nan_kept = None
    if native.lib() is not None:
        x = torch.tensor([[[[float("nan"), 1.0], [0.5, 2.0]]]], dtype=torch.float64)
        nan_kept = bool(fastops._apply_PoolReLU(x)[0].isnan().all())
    print(json.dumps({"status": status, "build": native.build_id(), "nan_kept": nan_kept,
                      "warnings": [str(w.message) for w in caught]}))
    """
)


@needs_kernels
def test_a_fast_math_build_is_refused(tmp_path):
    """A real miscompile: with -ffast-math (the default of some compilers) GCC drops the pool kernels' NaN
    tests, so a NaN no longer wins its window as in ATen. The self-check refuses that build (one warning
    line, status and build_id say so). A compiler that keeps the NaN rule may pass, but must then be exact."""
    env = {
        **os.environ,
        "FEWSCAN_NATIVE_CACHE": str(tmp_path),
        "FEWSCAN_NATIVE_ARCH": f"{os.environ.get('FEWSCAN_NATIVE_ARCH', '-march=native')} -ffast-math",
    }
    out = subprocess.run(
        [sys.executable, "-c", _FAST_MATH_CHILD],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout.strip().splitlines()[-1])
    if child["status"] == "loaded":
        assert child["nan_kept"], "a fast-math build passed the self-check but drops NaN"
        return
    assert child["status"].startswith("failed self-check: pool2_relu_fwd_"), child["status"]
    assert child["build"] == "torch"
    assert len(child["warnings"]) == 1 and "\n" not in child["warnings"][0], child["warnings"]
