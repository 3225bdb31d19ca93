"""CPU-fast GroupNorm and 2x2 max-pool for the backbones, exact (same values, same gradients).

Why (measured, benchmarks/RESULTS.md "engine"): on CPU, second-order MAML through Conv-4 spends a third of
its time outside the convolutions.
- `nn.GroupNorm`'s backward, when it must itself be differentiable (every inner step of second-order MAML),
  falls back to a composite of ~80 small ops per call, and the outer backward differentiates all of them.
  `GroupNorm2` keeps the native fused backward kernel for the first derivative and writes the second
  derivative out analytically (a dozen reductions and elementwise ops; derivation in
  `_GroupNormBackward.backward`). Values are identical to `nn.GroupNorm`; gradients and second
  derivatives agree to rounding (tests/meta/test_fastops.py, gradcheck/gradgradcheck in float64).
- ATen's NCHW max-pool forward kernel is scalar on this CPU (21 ms for a 75x64x28x28 query batch); the
  channels-last kernel is vectorised over channels (7.5 ms including the layout round trip).
  `max_pool2` runs the channels-last kernel and returns a contiguous result; the backward is ATen's own
  `max_pool2d_with_indices_backward`, differentiable w.r.t. the incoming gradient (second order).

Both are CPU-only fast paths: on other devices, under `torch.func.vmap` (batched tensors), under forward-mode
AD, or for shapes they do not cover they defer to the stock PyTorch op, so a model never depends on them for correctness. State
dicts are unchanged (`GroupNorm2` is an `nn.GroupNorm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C import _functorch
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable


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


# ----------------------------------------------------------------------------------------- group norm
def _group_view(t: Tensor, n: int, g: int) -> Tensor:
    return t.reshape(n, g, -1)


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

    @staticmethod
    def backward(ctx, gy, _gm, _gr):  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        gx, gw, gb = _GroupNormBackward.apply(gy, x, weight, mean, rstd, ctx.groups)
        return gx, gw, gb, None, None


class _GroupNormBackward(torch.autograd.Function):
    """(gy, x, weight) -> (gx, gweight, gbias) of GroupNorm, with an analytic backward (the second derivative)."""

    @staticmethod
    def forward(gy, x, weight, mean, rstd, groups):  # type: ignore[override]
        n, c = x.shape[:2]
        return torch.ops.aten.native_group_norm_backward(
            gy.contiguous(), x, mean, rstd, weight, n, c, x[0, 0].numel(), groups, [True, True, True]
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
        g = ctx.groups
        n, c = x.shape[:2]
        shape = x.shape
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
            return _GroupNorm.apply(x.contiguous(), self.weight, self.bias, self.num_groups, self.eps)[0]
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
        return _MaxPool2.apply(x.contiguous())[0]
    return F.max_pool2d(x, 2)


class MaxPool2(nn.Module):
    """2x2(x2) max-pool, stride 2, as a module (see `max_pool2`)."""

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2(x)
