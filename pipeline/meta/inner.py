"""THE inner loop: `adapt(model, params, x, y, ...) -> params`, pure and functional.

One function serves meta-training (MAML, FO-MAML, ANIL, Meta-SGD, MAML++), adaptation to a new
condition, the fine-tuning / from-scratch baselines and evaluation (docs/ARCHITECTURE.md, principle 1). It never
touches the module's own parameters: it takes a dict of tensors, runs `steps` steps of gradient descent on
the support loss with `torch.func.functional_call` + `torch.func.grad`, and returns the new dict. (On plain
tensors, outside any torch.func transform, the same gradient is taken with `torch.autograd.grad`: equal
values, without functorch's per-op dispatch cost; see `adapt`.)

- Composes with `torch.func.vmap` over tasks (the meta-batch) and with ordinary autograd for the outer
  loop: with `second_order=True` the returned tensors stay differentiable w.r.t. the input params (and the
  learning rates) through every inner step; with `second_order=False` the inner gradients are computed on
  detached copies, so the outer gradient is the first-order MAML one, ∂L_q(θ')/∂θ' (and the learning rates
  still get their first-order signal, -g).
- Learning rates: a float; a mapping name → tensor (a scalar tensor per layer, or a tensor of the
  parameter's shape for Meta-SGD); or a sequence of such mappings, one per step (MAML++ LSLR; steps past
  the end reuse the last one).
- `checkpoint=True` (second order only) recomputes each inner step during the backward pass instead of
  storing its activations: memory grows with the number of inner steps by one parameter set per step
  instead of one full double-backward graph per step.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

Params = dict[str, Tensor]
LRSpec = float | Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]


def lr_at(lr: LRSpec, step: int, name: str) -> float | Tensor:
    """The learning rate of parameter `name` at inner step `step` (0-based)."""
    if isinstance(lr, (int, float)):
        return float(lr)
    if isinstance(lr, Mapping):
        if name not in lr:
            raise KeyError(f"no inner learning rate for parameter '{name}' (have: {', '.join(sorted(lr))})")
        return lr[name]
    if len(lr) == 0:
        raise ValueError("per-step learning rates: the sequence is empty")
    return lr_at(lr[min(step, len(lr) - 1)], step, name)


def detach_lr(lr: LRSpec) -> LRSpec:
    """A copy of `lr` cut from the graph (learned rates used at test time)."""
    if isinstance(lr, (int, float)):
        return float(lr)
    if isinstance(lr, Mapping):
        return {k: v.detach() for k, v in lr.items()}
    return [{k: v.detach() for k, v in d.items()} for d in lr]


def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: LRSpec,
    second_order: bool = False,
    trainable: Collection[str] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    buffers: Mapping[str, Tensor] | None = None,
    checkpoint: bool = False,
    trajectory: bool = False,
    clip_grad: float | None = None,
) -> Params | list[Params]:
    """Adapt `params` to the support set (x, y) with `steps` steps of gradient descent.

    Args:
        model: any `nn.Module`; only its structure is used (via `functional_call`).
        params: every parameter the forward needs, by `named_parameters` name, e.g. from
            `FewShotNet.task_params(n_way)`. Shapes as the forward expects (the head may be (n_way, F)).
        x: support inputs (n, C, *spatial); y: targets (n,) int64 class indices, or regression targets.
        steps: number of inner gradient steps; 0 returns `params` unchanged.
        lr: see module docstring.
        second_order: keep the graph of the inner gradients (full MAML) instead of first order.
        trainable: names adapted in the inner loop (None = all); the others are held fixed but still used
            (ANIL: `trainable=("head.weight", "head.bias")`; head-only fine-tuning alike).
        loss_fn: (model output, y) -> scalar; cross-entropy by default.
        buffers: extra non-parameter tensors for `functional_call` (none for our models).
        checkpoint: recompute each inner step in backward (memory-bounded second order).
        trajectory: return the list [params after step 0, ..., after step `steps`] (MAML++ multi-step loss).
        clip_grad: scale each step's gradient (over the trainable tensors together) to at most this norm.
            A large inner lr with per-sample normalization can overshoot on a few support scans and diverge
            within 2-3 steps; clipping bounds each step (docs/evaluation.md, "Stable MAML settings"). No branch on
            data: the scale min(1, c/‖g‖) is computed in-graph, so it composes with vmap and second order.

    Returns:
        The adapted parameter dict (all of `params`' keys), or the trajectory list when `trajectory=True`.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    names = [k for k in params if trainable is None or k in trainable]
    if trainable is not None:
        missing = [k for k in trainable if k not in params]
        if missing:
            raise KeyError(f"trainable parameter(s) {missing} not in params (have: {', '.join(params)})")
    fixed = {k: v for k, v in params.items() if k not in names}
    bufs = dict(buffers) if buffers else {}

    def support_loss(fast: Params, fixed_: Params, x_: Tensor, y_: Tensor) -> Tensor:
        out = functional_call(model, (fast, fixed_, bufs), (x_,))
        return loss_fn(out, y_)

    # Two ways to take the inner gradient, same values: `torch.func.grad` composes with vmap (and with
    # outer torch.func transforms), so it is used whenever the tensors are functorch-wrapped; on plain
    # tensors `torch.autograd.grad` is used because functorch's per-op dispatch layer costs ~8% of a CPU
    # second-order meta-step and makes custom autograd Functions (fastops.py) pay a Python wrapper per call.
    use_func = _functorch_wrapped(x) or any(_functorch_wrapped(v) for v in params.values())
    grad_fn = grad(support_loss)

    def autograd_grads(fast: Params, fixed_: Params, create_graph: bool) -> Params:
        if not create_graph:
            # First order (or no outer graph wanted): differentiate detached leaves, keep no graph.
            fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
            fixed_ = {k: v.detach() for k, v in fixed_.items()}
        else:
            fast = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in fast.items()}
        with torch.enable_grad():
            loss = support_loss(fast, fixed_, x, y)
            gs = torch.autograd.grad(
                loss,
                list(fast.values()),
                create_graph=create_graph,
                allow_unused=True,
                materialize_grads=True,
            )
        return dict(zip(fast, gs))

    def step(i: int, fast: Params, fixed_: Params, lrs: Mapping[str, float | Tensor]) -> Params:
        if not use_func:
            g = autograd_grads(fast, fixed_, second_order and torch.is_grad_enabled())
        elif second_order:
            g = grad_fn(fast, fixed_, x, y)
        else:
            # First order: differentiate on detached copies so no graph is kept through the gradient.
            g = grad_fn(
                {k: v.detach() for k, v in fast.items()}, {k: v.detach() for k, v in fixed_.items()}, x, y
            )
        if clip_grad is not None:
            norm = torch.sqrt(torch.stack([(g[k] * g[k]).sum() for k in names]).sum())
            scale = torch.clamp(clip_grad / (norm + 1e-12), max=1.0)
            g = {k: g[k] * scale for k in names}
        return {k: fast[k] - lrs[k] * g[k] for k in names}

    if clip_grad is not None and clip_grad <= 0:
        raise ValueError(f"clip_grad must be > 0 (or None), got {clip_grad}")
    fast: Params = {k: params[k] for k in names}
    out = [dict(params)]
    for i in range(steps):
        lrs = {k: lr_at(lr, i, k) for k in names}
        if checkpoint and second_order and torch.is_grad_enabled():
            fast = _checkpointed_step(step, i, fast, fixed, lrs)
        else:
            fast = step(i, fast, fixed, lrs)
        if trajectory or i == steps - 1:
            out.append({**fixed, **fast})
    if trajectory:
        return out
    return out[-1]


def _functorch_wrapped(t: Tensor) -> bool:
    """True for a tensor seen through a torch.func transform (vmap's batched or grad's tracking wrapper)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


class _RecomputedStep(torch.autograd.Function):
    """Activation checkpointing for one inner step, written out because `torch.utils.checkpoint` relies on
    saved-tensor hooks, which `torch.func.grad` refuses. Forward runs without a graph and keeps only the
    inputs; backward recomputes the step (with its double-backward graph) and differentiates it."""

    @staticmethod
    def forward(ctx, run, n_out, *tensors):  # type: ignore[override]
        ctx.run = run
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            outs = run(tensors)
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grad_outs):  # type: ignore[override]
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in saved]
        with torch.enable_grad():
            outs = ctx.run(inputs)
        want = [i for i, t in enumerate(inputs) if t.requires_grad]
        grads = torch.autograd.grad(
            outs, [inputs[i] for i in want], grad_outs, allow_unused=True, materialize_grads=True
        )
        full: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(want, grads):
            full[i] = g
        return (None, None, *full)


def _checkpointed_step(
    step: Callable[[int, Params, Params, Mapping[str, float | Tensor]], Params],
    i: int,
    fast: Params,
    fixed: Params,
    lrs: Mapping[str, float | Tensor],
) -> Params:
    """One inner step under activation checkpointing: only its inputs are stored; recomputed in backward."""
    names, fixed_names = list(fast), list(fixed)
    lr_names = [k for k, v in lrs.items() if isinstance(v, Tensor)]
    nf, nx = len(names), len(fixed_names)

    def run(vals):
        f = dict(zip(names, vals[:nf]))
        fx = dict(zip(fixed_names, vals[nf : nf + nx]))
        lr_t = dict(zip(lr_names, vals[nf + nx :]))
        new = step(i, f, fx, {k: lr_t.get(k, lrs[k]) for k in names})
        return tuple(new[k] for k in names)

    tensors = [fast[k] for k in names] + [fixed[k] for k in fixed_names] + [lrs[k] for k in lr_names]
    new_vals = _RecomputedStep.apply(run, nf, *tensors)
    return dict(zip(names, new_vals))


def adapt_params(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    **kw,
) -> Params:
    """`adapt` with `trajectory=False`, typed as returning one dict (convenience for callers and mypy)."""
    kw.pop("trajectory", None)
    res = adapt(model, params, x, y, trajectory=False, **kw)
    assert isinstance(res, dict)
    return res


def forward(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, buffers: Mapping[str, Tensor] | None = None
):
    """The model's output with `params` (and optional buffers): the query-side counterpart of `adapt`."""
    return functional_call(model, (dict(params), dict(buffers or {})), (x,))
