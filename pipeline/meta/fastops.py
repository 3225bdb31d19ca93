"""CPU fast paths for the Conv-4 backbone: convolution on the images, GroupNorm, 2x2 max-pool + ReLU.

Exact: the same function and the same gradients and second derivatives as the stock PyTorch ops, up to
rounding (tests/meta/test_fastops.py and test_native.py, gradcheck/gradgradcheck in float64).

Why (measured, benchmarks/RESULTS.md "engine"): second-order MAML through Conv-4 on a CPU spent about 40 %
of its time outside the convolutions, and the first convolution itself ran far from peak.
- `Conv2d2`: on an input that needs no gradient (the images), the convolution is one matmul with the
  image's im2col matrix, and its double backward skips the input-gradient term that ATen computes anyway
  (a slow transposed convolution with one output channel). See "fixed-input convolution" below.
- `GroupNorm2`: `nn.GroupNorm`'s backward, when it must itself be differentiable (every inner step of
  second-order MAML), falls back to a composite of ~80 small ops per call, and the outer backward
  differentiates all of them. `GroupNorm2` keeps the native fused backward kernel for the first derivative
  and writes the second derivative out analytically (derivation in `_GroupNormBackward.backward`), in one
  C kernel (csrc/, pipeline/meta/native.py) or, where that is not built, as a dozen tensor ops.
- `MaxPoolReLU2`: ReLU(max-pool) in one C kernel pass forward and one backward (an AVX-512 kernel where
  the CPU has it; ATen's NCHW max-pool forward is scalar here: 8.2 vs 0.9 ms for a 75x64x28x28 query
  batch, ReLU included). Without the kernel: ATen's channels-last max-pool (`max_pool2`) and a ReLU.
- The Functions are applied through `_fast_apply`, which skips `Function.apply`'s per-call Python
  overhead outside torch.func transforms (through torch's private C entry point, checked at import; the
  public `Function.apply` where that is missing or behaves otherwise).

All are CPU-only fast paths: on other devices, under `torch.func.vmap` (batched tensors), under
forward-mode AD, or for shapes and options they do not cover they defer to the stock PyTorch ops, so a
model never depends on them for correctness. State dicts are unchanged (`GroupNorm2` is an
`nn.GroupNorm`, `Conv2d2` an `nn.Conv2d`; `MaxPoolReLU2` has no parameters).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C import _functorch
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from pipeline.meta import native


def _is_plain_cpu(x: Tensor) -> bool:
    """True for an ordinary CPU tensor; False under vmap (batched tensors take the stock op) and under
    forward-mode AD (torch.func.jvp, torch.autograd.forward_ad), which the fast paths do not implement."""
    if x.device.type != "cpu":
        return False
    if forward_ad._current_level >= 0:  # inside a dual level: the stock ops have forward-mode formulas
        return False
    t = x
    # Unwrap grad-tracking wrappers (torch.func.grad) to see whether a vmap level sits underneath.
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return False
        t = _functorch.get_unwrapped(t)
    return True


class _Probe(torch.autograd.Function):
    """x -> 3·x, written like the Functions below (no ctx in forward, a `setup_context`)."""

    @staticmethod
    def forward(x: Tensor, k: float):  # type: ignore[override]
        return x * k

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.k = inputs[1]

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        return gy * ctx.k, None


def _checked_c_apply(candidate):
    """`candidate` (the private `torch._C._FunctionBase.apply`) if it applies a `setup_context` Function as
    the public `Function.apply` does (same output, a graph node of that Function, its backward), else None.

    The private entry point is not a documented API: a torch release may drop it or change what it does;
    then the Functions keep the public path, only slower. The probe runs in a fresh thread, so that grad
    mode and transforms of whoever imports this module do not enter it."""
    if candidate is None:
        return None
    ok: list[bool] = []

    def probe() -> None:
        try:
            x = torch.arange(3.0, requires_grad=True)
            y = candidate.__get__(None, _Probe)(x, 3.0)
            (gx,) = torch.autograd.grad(y.sum(), x)
            ok.append(
                isinstance(y, Tensor)
                and y.grad_fn is not None
                and type(y.grad_fn).__name__ == "_ProbeBackward"
                and torch.equal(y.detach(), x.detach() * 3)
                and torch.equal(gx, torch.full((3,), 3.0))
            )
        except Exception:
            ok.append(False)

    t = threading.Thread(target=probe, name="fewscan-apply-probe")
    t.start()
    t.join()
    return candidate if ok and ok[0] else None


_C_APPLY = _checked_c_apply(torch._C._FunctionBase.__dict__.get("apply"))


def _fast_apply(fn: type[torch.autograd.Function], c_apply=_C_APPLY):
    """`fn.apply`, minus the Python wrapper's per-call overhead where that is safe.

    `Function.apply` binds default arguments with `inspect.signature` on every call of a Function that
    defines `setup_context` (~20 µs; measured 29 vs 9.5 µs per call, and these Functions run ~1,200 times
    per Conv-4 meta-batch, holding the GIL the task threads share). The C entry point it ends in,
    `torch._C._FunctionBase.apply`, handles `setup_context` Functions itself; the wrapper only adds work
    for functorch transforms, so they keep it: under an active transform, or with a functorch-wrapped
    argument, this calls `fn.apply`. None of these Functions has default arguments to bind. The C entry
    point is private: it is used only if `_checked_c_apply` found it present and behaving as the public
    path (`c_apply`); otherwise this is the public `fn.apply`."""
    if c_apply is None:  # missing, or not behaving as the public path: the public path
        return fn.apply
    bound = c_apply.__get__(None, fn)
    active = torch._C._are_functorch_transforms_active
    wrapped = _functorch.is_functorch_wrapped_tensor

    def apply(*args):
        if active() or any(isinstance(a, Tensor) and wrapped(a) for a in args):
            return fn.apply(*args)
        return bound(*args)

    return apply


# ----------------------------------------------------------------------------------------- group norm
class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float):  # type: ignore[override]
        n, c = x.shape[:2]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), groups, eps)
        return y, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, groups, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of mean and rstd

    @staticmethod
    def backward(ctx, gy, _gm, _gr):  # type: ignore[override]
        if gy is None:
            return None, None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        gx, gw, gb = _apply_GroupNormBackward(gy.contiguous(), x, weight, mean, rstd, ctx.groups)
        return gx, gw, gb, None, None


class _GroupNormBackward(torch.autograd.Function):
    """(gy, x, weight) -> (gx, gweight, gbias) of GroupNorm, with an analytic backward (the second derivative)."""

    @staticmethod
    def forward(gy, x, weight, mean, rstd, groups):  # type: ignore[override]
        n, c = x.shape[:2]
        return torch.ops.aten.native_group_norm_backward(
            gy, x, mean, rstd, weight, n, c, x[0, 0].numel(), groups, [True, True, True]
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, weight, mean, rstd, groups = inputs
        ctx.save_for_backward(gy, x, weight, mean, rstd)
        ctx.groups = groups

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):  # type: ignore[override]
        """Derivation, per sample and group (M elements, x̂ = (x - μ)·r, r = 1/sqrt(var + eps), u = γ·gy):

            gx = r·P(u),   P(v) = v - mean(v) - x̂·mean(v·x̂)   (P symmetric; ∂x̂/∂x = r·P)
            gγ_c = Σ_{n, space} gy·x̂,   gβ_c = Σ gy

        For incoming (ε = ggx, δ = ggγ, b = ggβ):
            ∂/∂u   = r·P(ε)                    → ∂/∂gy = γ·r·P(ε) + δ·x̂ + b,  ∂/∂γ = Σ gy·r·P(ε)
            ∂/∂x   = r·P(gy·δ) - (r²/M)·[x̂·S + Σ(u·x̂)·P(ε) + Σ(ε·x̂)·P(u)],
                     S = Σ ε·u - Σε·Σu/M - Σ(ε·x̂)·Σ(u·x̂)/M
        (r depends on x through ∂r/∂x = -r²·x̂/M; the Σ are over the group's M elements).
        """
        gy, x, weight, mean, rstd = ctx.saved_tensors
        if ggx is None and ggw is None and ggb is None:
            return None, None, None, None, None, None
        g = ctx.groups
        n, c = x.shape[:2]
        shape = x.shape
        args = [t.contiguous() if t is not None else None for t in (ggx, ggw, ggb)]
        if native.usable(gy, x, weight, mean, rstd, *[t for t in args if t is not None]):
            # the same formulas in one C pass pair (csrc/fastops_impl.h), instead of ~40 tensor ops
            out_gy = torch.empty_like(gy)
            need_x = ctx.needs_input_grad[1] and (ggx is not None or ggw is not None)
            out_x = torch.empty_like(x) if need_x else None
            out_w = torch.zeros_like(weight) if ctx.needs_input_grad[2] else None
            native.fn("gn_double_backward", x.dtype)(
                n,
                c,
                g,
                x[0, 0].numel(),
                *map(native.ptr, (gy, x, mean, rstd, weight, *args, out_gy, out_x, out_w)),
            )
            return out_gy, out_x, out_w, None, None, None
        d = c // g
        xv = x.reshape(n, g, d, -1)
        yv = gy.reshape(n, g, d, -1)
        m = xv.shape[2] * xv.shape[3]
        r = rstd.reshape(n, g, 1, 1)
        xh = (xv - mean.reshape(n, g, 1, 1)) * r
        gam = weight.reshape(1, g, d, 1)

        # Everything above is a sum over the group's M elements of a product of (ε, gy) with (1, x̂, gy).
        # Sum over space per channel first, then over the group's channels: five full-size reductions.
        def csum(t: Tensor) -> Tensor:  # (n, g, d, 1): per-channel sums over space
            return t.sum(dim=3, keepdim=True)

        def gsum(t: Tensor) -> Tensor:  # (n, g, 1, 1): per-group sums of per-channel sums
            return t.sum(dim=2, keepdim=True)

        sy, syx = csum(yv), csum(yv * xh)  # Σ gy, Σ gy·x̂ per channel
        g_gy: Tensor | int = 0
        g_x: Tensor | int = 0
        g_w = None
        if ggb is not None:
            g_gy = ggb.reshape(1, g, d, 1).expand(n, g, d, 1)
        if ggx is not None:
            e = ggx.reshape(n, g, d, -1)
            se, sex, sye = csum(e), csum(e * xh), csum(yv * e)
            # group sums; u = γ·gy so Σu, Σu·x̂, Σε·u are γ-weighted channel sums
            s_e, s_ex = gsum(se), gsum(sex)
            s_u, s_ux, s_eu = gsum(gam * sy), gsum(gam * syx), gsum(gam * sye)
            s = s_eu - s_e * s_u / m - s_ex * s_ux / m
            # ∂/∂gy = γ·r·P(ε) = γr·ε - γr·Σε/M - γr·Σεx̂/M·x̂
            gr = gam * r
            g_gy = g_gy + gr * e - gr * (s_e / m) - (gr * (s_ex / m)) * xh
            if ctx.needs_input_grad[2]:
                # ∂/∂γ_c = Σ_n r·(Σ gy·ε - Σε/M·Σ gy - Σεx̂/M·Σ gy·x̂)   (per channel)
                g_w = (r * (sye - (s_e / m) * sy - (s_ex / m) * syx)).sum(dim=(0, 3)).reshape(c)
            # ∂/∂x = -(r²/M)·[x̂·S + Σux̂·P(ε) + Σεx̂·P(u)], expanded into ε, gy, x̂ and constant terms
            k = r * r / m
            coef_e = -k * s_ux
            coef_y = (-k * s_ex) * gam
            coef_xh = -k * (s - 2 * s_ux * s_ex / m)
            const = k * (s_ux * s_e + s_ex * s_u) / m
            g_x = g_x + coef_e * e + coef_y * yv + coef_xh * xh + const
        elif ctx.needs_input_grad[2]:
            g_w = torch.zeros_like(weight)
        if ggw is not None:
            dl = ggw.reshape(1, g, d, 1)
            g_gy = g_gy + dl * xh
            # r·P(gy·δ) = r·δ·gy - r·Σ(gy·δ)/M - r·Σ(gy·δ·x̂)/M·x̂
            s_yd, s_yxd = gsum(dl * sy), gsum(dl * syx)
            g_x = g_x + (r * dl) * yv - r * (s_yd / m) - (r * (s_yxd / m)) * xh
        out_gy = g_gy.expand(n, g, d, xv.shape[3]).reshape(shape) if isinstance(g_gy, Tensor) else None
        out_x = g_x.expand(n, g, d, xv.shape[3]).reshape(shape) if isinstance(g_x, Tensor) else None
        if g_w is not None and g_w.shape != weight.shape:
            g_w = g_w.reshape(weight.shape)
        return out_gy, out_x, g_w, None, None, None


class GroupNorm2(nn.GroupNorm):
    """`nn.GroupNorm` with the CPU-fast, analytically twice-differentiable path (module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.affine
            and x.dim() >= 3
            and x.shape[0] > 0
            and _is_plain_cpu(x)
            and x.dtype in (torch.float32, torch.float64)
        ):
            return _apply_GroupNorm(x.contiguous(), self.weight, self.bias, self.num_groups, self.eps)[0]
        return super().forward(x)


# ------------------------------------------------------------------------------ fixed-input convolution
# The first convolution of a network sees the images, which never need a gradient. Stock autograd still
# pays for one: `convolution_backward`'s double backward computes the input-gradient term (a transposed
# convolution, slow for one input channel) even when the input does not require grad (measured: 2.1 ms vs
# 0.07 ms per inner step for a 5×1×28×28 support set). And oneDNN's forward kernel with one input channel
# is far from peak. With the input constant, the convolution is one matmul of the weight with the image's
# im2col matrix, its weight gradient is `convolution_backward` with only the weight/bias outputs, and its
# double backward is just the forward applied to the incoming weight direction.
_IM2COL_MAX_K = 32  # in_channels·kh·kw up to which im2col + matmul beats oneDNN (measured for K = 9)


def _im2col(x: Tensor, weight: Tensor, padding: tuple[int, int]) -> Tensor | None:
    """The im2col matrix of `x` with a row of ones appended (the bias then rides in the same matmul,
    instead of a broadcast copy of the bias into the output first: 2.0 vs 3.1 ms on a 75-image query)."""
    if x.shape[1] * weight.shape[2] * weight.shape[3] > _IM2COL_MAX_K:
        return None
    cols = F.unfold(x, weight.shape[2:], padding=padding)  # (n, cin·kh·kw, L)
    return torch.cat([cols, cols.new_ones(cols.shape[0], 1, cols.shape[2])], dim=1)


def _conv_fixed(x: Tensor, cols: Tensor | None, weight: Tensor, bias: Tensor | None, padding) -> Tensor:
    """conv2d(x, weight, bias, padding) (stride 1), via the augmented im2col matrix `cols` when given."""
    if cols is None:
        return F.conv2d(x, weight, bias, padding=padding)
    n, c = x.shape[0], weight.shape[0]
    h = x.shape[2] + 2 * padding[0] - weight.shape[2] + 1
    w = x.shape[3] + 2 * padding[1] - weight.shape[3] + 1
    b = bias.reshape(c, 1) if bias is not None else weight.new_zeros(c, 1)
    wa = torch.cat([weight.reshape(c, -1), b], dim=1)
    return torch.bmm(wa.unsqueeze(0).expand(n, c, wa.shape[1]), cols).view(n, c, h, w)


class _FixedInputConv(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, padding):  # type: ignore[override]
        cols = _im2col(x, weight, padding)
        y = _conv_fixed(x, cols, weight, bias, padding)
        return y, (cols if cols is not None else x.new_empty(0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, padding = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1], weight)
        ctx.padding, ctx.has_bias = padding, bias is not None

    @staticmethod
    def backward(ctx, gy, _gcols):  # type: ignore[override]
        x, cols, weight = ctx.saved_tensors
        gw, gb = _apply_FixedInputConvBackward(gy, x, cols, weight, ctx.has_bias, ctx.padding)
        return None, gw, gb, None


class _FixedInputConvBackward(torch.autograd.Function):
    """gy -> (gweight, gbias) of a convolution with a constant input; linear in gy, so its derivative is
    the convolution of the input with the incoming (ggweight, ggbias)."""

    @staticmethod
    def forward(gy, x, cols, weight, has_bias, padding):  # type: ignore[override]
        _, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, weight, [weight.shape[0]] if has_bias else None, [1, 1], list(padding), [1, 1],
            False, [0, 0], 1, [False, True, has_bias],
        )  # fmt: skip
        return gw, gb

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, cols, weight, has_bias, padding = inputs
        ctx.save_for_backward(x, cols)
        ctx.padding, ctx.gy_shape = padding, gy.shape

    @staticmethod
    @once_differentiable
    def backward(ctx, ggw, ggb):  # type: ignore[override]
        x, cols = ctx.saved_tensors
        if ggw is None:
            if ggb is None:
                return (None,) * 6
            return ggb.view(1, -1, 1, 1).expand(ctx.gy_shape).contiguous(), None, None, None, None, None
        g_gy = _conv_fixed(x, cols if cols.numel() else None, ggw, ggb, ctx.padding)
        return g_gy, None, None, None, None, None


class Conv2d2(nn.Conv2d):
    """`nn.Conv2d` with the CPU fast path for an input that needs no gradient (the images; see above).
    Other inputs, devices, transforms and options take the stock op. State dicts are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            torch.is_grad_enabled()
            and not x.requires_grad
            and x.dim() == 4
            and x.shape[0] > 0
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and x.dtype == self.weight.dtype
            and x.dtype in (torch.float32, torch.float64)
            and not _functorch.is_functorch_wrapped_tensor(x)
            and _is_plain_cpu(self.weight)
        ):
            return _apply_FixedInputConv(x.contiguous(), self.weight, self.bias, self.padding)[0]
        return super().forward(x)


# ------------------------------------------------------------------------------------------- max pool
class _MaxPool2(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor):  # type: ignore[override]
        y, idx = F.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), [2, 2])
        return y.contiguous(), idx.contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, gy, _gidx):  # type: ignore[override]
        x, idx = ctx.saved_tensors
        # ATen's backward is itself differentiable w.r.t. gy (a gather by `idx`): second order works.
        return torch.ops.aten.max_pool2d_with_indices_backward(
            gy.contiguous(), x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
        )


def max_pool2(x: Tensor) -> Tensor:
    """`F.max_pool2d(x, 2)` (2D) / `F.max_pool3d(x, 2)` (3D), with the CPU channels-last fast path in 2D."""
    if x.dim() == 5:
        return F.max_pool3d(x, 2)
    if x.dim() == 4 and x.shape[0] > 0 and _is_plain_cpu(x):
        return _apply_MaxPool2(x.contiguous())[0]
    return F.max_pool2d(x, 2)


# ---------------------------------------------------------------------------------- max pool + ReLU
class _PoolReLU(torch.autograd.Function):
    """relu(max_pool2d(x, 2)) in one C pass (csrc/fastops_impl.h); the backward scatters gy to the
    recorded window position (a code per output: 0..3, or 4 where the ReLU blocks), writing every
    element of gx once, and is itself differentiable (a gather) for second-order MAML."""

    @staticmethod
    def forward(x: Tensor):  # type: ignore[override]
        n, c, h, w = x.shape
        y = x.new_empty(n, c, h // 2, w // 2)
        code = torch.empty(n, c, h // 2, w // 2, dtype=torch.uint8)
        native.fn("pool2_relu_fwd", x.dtype)(n * c, h, w, x.data_ptr(), y.data_ptr(), code.data_ptr())
        return y, code

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.hw = inputs[0].shape[2:]
        ctx.set_materialize_grads(False)  # no zero tensor for the gradient of `code`

    @staticmethod
    def backward(ctx, gy, _gcode):  # type: ignore[override]
        if gy is None:
            return None
        (code,) = ctx.saved_tensors
        return _apply_PoolReLUBackward(gy.contiguous(), code, *ctx.hw)


class _PoolReLUBackward(torch.autograd.Function):
    @staticmethod
    def forward(gy: Tensor, code: Tensor, h: int, w: int):  # type: ignore[override]
        n, c = gy.shape[:2]
        gx = gy.new_empty(n, c, h, w)
        native.fn("pool2_relu_bwd", gy.dtype)(n * c, h, w, gy.data_ptr(), code.data_ptr(), gx.data_ptr())
        return gx

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.hw = inputs[2:]

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx):  # type: ignore[override]
        (code,) = ctx.saved_tensors
        ggx = ggx.contiguous()
        n, c = code.shape[:2]
        ggy = ggx.new_empty(code.shape)
        h, w = ctx.hw
        native.fn("pool2_relu_gather", ggx.dtype)(
            n * c, h, w, ggx.data_ptr(), code.data_ptr(), ggy.data_ptr()
        )
        return ggy, None, None, None


def pool2_relu(x: Tensor) -> Tensor:
    """`relu(max_pool(x, 2))`, 2D or 3D; the fused C kernel for CPU float tensors (exact: same values, same
    gradient routing on ties as ATen), else the stock ops."""
    if (
        x.dim() == 4
        and x.shape[0] > 0
        and min(x.shape[2:]) >= 2
        and _is_plain_cpu(x)
        and not _functorch.is_functorch_wrapped_tensor(x)
        and native.usable(x.contiguous())
        and (x.dtype == torch.float64 or native.pool_simd())
    ):
        return _apply_PoolReLU(x.contiguous())[0]
    return F.relu(max_pool2(x))


class MaxPoolReLU2(nn.Module):
    """2x2(x2) max-pool, stride 2, then ReLU, as one module (see `pool2_relu`)."""

    def forward(self, x: Tensor) -> Tensor:
        return pool2_relu(x)


# ------------------------------------------------------------------------ GroupNorm + max pool + ReLU
class _GNPoolReLU(torch.autograd.Function):
    """relu(max_pool2d(group_norm(x), 2)) without writing the normalised tensor: one C kernel forward
    (statistics, then each channel normalised into a cache-sized scratch plane and pooled from there), one
    fused C kernel for a first-order backward. Under `create_graph` (an inner step of second-order MAML)
    the backward is the composition of the two differentiable backward Functions above, so the outer
    backward can differentiate it. On a 75x64x28x28 query batch this saves writing and re-reading two
    full-size tensors (the normalised output forward, the pool's scattered gradient backward)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float):  # type: ignore[override]
        n, c, h, w = x.shape
        y = x.new_empty(n, c, h // 2, w // 2)
        code = torch.empty(n, c, h // 2, w // 2, dtype=torch.uint8)
        mean, rstd = x.new_empty(n, groups), x.new_empty(n, groups)
        rc = native.fn("gn_pool_relu_fwd", x.dtype)(
            n, c, groups, h, w, eps, *map(native.ptr, (x, weight, bias, y, code, mean, rstd))
        )
        if rc:
            raise MemoryError(f"gn_pool_relu_fwd could not allocate a {h}x{w} scratch plane")
        return y, code, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, groups, _ = inputs
        _, code, mean, rstd = output
        ctx.mark_non_differentiable(code, mean, rstd)
        ctx.save_for_backward(x, weight, code, mean, rstd)
        ctx.groups = groups
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gy, _gcode, _gmean, _grstd):  # type: ignore[override]
        if gy is None:
            return None, None, None, None, None
        x, weight, code, mean, rstd = ctx.saved_tensors
        gy = gy.contiguous()
        n, c, h, w = x.shape
        if torch.is_grad_enabled():  # create_graph: keep the graph differentiable
            g_full = _apply_PoolReLUBackward(gy, code, h, w)
            gx, gw, gb = _apply_GroupNormBackward(g_full, x, weight, mean, rstd, ctx.groups)
            return gx, gw, gb, None, None
        gx, gw, gb = torch.empty_like(x), torch.zeros_like(weight), torch.zeros_like(weight)
        rc = native.fn("gn_pool_relu_bwd", x.dtype)(
            n, c, ctx.groups, h, w, *map(native.ptr, (gy, code, x, mean, rstd, weight, gx, gw, gb))
        )
        if rc:
            raise MemoryError(f"gn_pool_relu_bwd could not allocate a {c}x{h}x{w} scratch block")
        return gx, gw, gb, None, None


def group_norm_pool_relu(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """`relu(max_pool(norm(x), 2))` for a Conv-4 block: the fused kernels where they apply (2D CPU float
    tensors, an affine GroupNorm), else `pool2_relu(norm(x))`. Same function, same gradients."""
    if (
        isinstance(norm, GroupNorm2)
        and norm.affine
        and x.dim() == 4
        and x.shape[0] > 0
        and min(x.shape[2:]) >= 2
        and _is_plain_cpu(x)
        and native.usable(x.contiguous(), norm.weight, norm.bias)
        and (x.dtype == torch.float64 or native.pool_simd())
    ):
        return _apply_GNPoolReLU(x.contiguous(), norm.weight, norm.bias, norm.num_groups, norm.eps)[0]
    return pool2_relu(norm(x))


# Bound once: the per-call appliers used above (see _fast_apply).
_apply_GroupNorm = _fast_apply(_GroupNorm)
_apply_GroupNormBackward = _fast_apply(_GroupNormBackward)
_apply_FixedInputConv = _fast_apply(_FixedInputConv)
_apply_FixedInputConvBackward = _fast_apply(_FixedInputConvBackward)
_apply_PoolReLU = _fast_apply(_PoolReLU)
_apply_PoolReLUBackward = _fast_apply(_PoolReLUBackward)
_apply_MaxPool2 = _fast_apply(_MaxPool2)
_apply_GNPoolReLU = _fast_apply(_GNPoolReLU)
