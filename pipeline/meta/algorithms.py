"""The meta-learning algorithms as configurations of one objective, plus ProtoNet.

| method   | inner loop adapts | inner learning rates                  | outer gradient                     |
|----------|-------------------|---------------------------------------|------------------------------------|
| maml     | all parameters    | fixed `inner.lr`                      | second order (`inner.second_order`) |
| fomaml   | all parameters    | fixed                                 | first order                        |
| anil     | head only         | fixed                                 | second order (cheap: head only)    |
| metasgd  | all parameters    | learned, one per parameter ELEMENT    | as `inner.second_order`            |
| mamlpp   | all parameters    | learned per layer (tensor) per step   | first order for the first `derivative_order_anneal` fraction of training, then as `inner.second_order`; multi-step loss with annealed weights |
| protonet | —                 | —                                     | plain backprop of the episode loss |

MAML (Finn et al. 2017); FO-MAML (ibid.); ANIL (Raghu et al. 2020); Meta-SGD (Li et al. 2017);
MAML++ (Antoniou et al. 2019: LSLR, multi-step loss, derivative-order annealing); ProtoNet (Snell et al. 2017).

`MetaLearner` is an `nn.Module` holding the network and the learned inner learning rates, so one
optimizer and one `state_dict` cover everything the outer loop learns. Its `meta_loss` maps a stacked
meta-batch (tasks, ...) to the mean query loss; the tasks run batched with `torch.func.vmap` (GPUs),
spread over CPU worker threads, or in a loop (see `MetaLearner.task_mode` and benchmarks/RESULTS.md (engine)
for why vmap is not the CPU default).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from pipeline.errors import ConfigError
from pipeline.meta import protonet
from pipeline.meta.inner import LRSpec, adapt, detach_lr, forward
from pipeline.meta.methods import FewShotMethod, GradientMethod, ProtoNetMethod
from pipeline.meta.models import FewShotNet

# The configuration models live in specs.py (no torch); re-exported here.
from pipeline.meta.specs import METHODS as METHODS
from pipeline.meta.specs import InnerConfig as InnerConfig
from pipeline.meta.specs import MAMLPlusPlusConfig as MAMLPlusPlusConfig


@dataclass(frozen=True)
class Algorithm:
    """What differs between the methods (see the module table)."""

    name: str
    trainable: Literal["all", "head"] = "all"
    learned_lr: Literal["none", "per_param", "per_layer_step"] = "none"
    second_order: bool = False
    multi_step_loss: bool = False
    msl_anneal: float = 0.0
    derivative_order_anneal: float = 0.0

    @property
    def is_gradient(self) -> bool:
        return self.name != "protonet"


def make_algorithm(name: str, inner: InnerConfig, mamlpp: MAMLPlusPlusConfig | None = None) -> Algorithm:
    """The `Algorithm` for a method name; unknown names fail with the valid choices."""
    so = inner.second_order
    if name == "maml":
        return Algorithm("maml", second_order=so)
    if name == "fomaml":
        return Algorithm("fomaml", second_order=False)
    if name == "anil":
        return Algorithm("anil", trainable="head", second_order=True)
    if name == "metasgd":
        return Algorithm("metasgd", learned_lr="per_param", second_order=so)
    if name == "mamlpp":
        pp = mamlpp or MAMLPlusPlusConfig()
        return Algorithm(
            "mamlpp",
            learned_lr="per_layer_step",
            second_order=so,
            multi_step_loss=pp.multi_step_loss,
            msl_anneal=pp.msl_anneal,
            derivative_order_anneal=pp.derivative_order_anneal if so else 0.0,
        )
    if name == "protonet":
        return Algorithm("protonet")
    raise ConfigError(f"unknown meta-learning method '{name}'; valid: {', '.join(METHODS)}")


def multi_step_weights(steps: int, progress: float, anneal: float) -> list[float]:
    """MAML++ multi-step loss weights at training progress in [0, 1]: uniform at 0, then the non-final
    weights decay linearly to 0.03/steps by `anneal` and the final step takes the rest (sum = 1)."""
    if steps <= 0:
        return []
    a = 1.0 if anneal <= 0 else min(max(progress, 0.0) / anneal, 1.0)
    other = (1.0 / steps) * (1 - a) + (0.03 / steps) * a
    w = [other] * (steps - 1)
    return w + [1.0 - sum(w)]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool per worker count (threads are reused across steps and learners)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fewscan-task")
    return _POOLS[workers]


def _lr_key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


class MetaLearner(nn.Module):
    """The network + the learned inner learning rates of one method, and its meta-training objective."""

    def __init__(self, model: FewShotNet, algo: Algorithm, inner: InnerConfig):
        super().__init__()
        self.model, self.algo, self.inner = model, algo, inner
        self.lr_params = nn.ParameterDict()
        self._replicas = threading.local()  # per-thread copies of the network structure (threads mode)
        names = self.adapted_names()
        if algo.learned_lr == "per_param":
            for k in names:
                self.lr_params[_lr_key(k)] = nn.Parameter(torch.full_like(self._param(k), inner.lr))
        elif algo.learned_lr == "per_layer_step":
            for i in range(max(inner.steps, 1)):
                for k in names:
                    self.lr_params[f"s{i}__{_lr_key(k)}"] = nn.Parameter(torch.tensor(float(inner.lr)))

    def _param(self, name: str) -> Tensor:
        return dict(self.model.named_parameters())[name]

    def adapted_names(self) -> list[str]:
        """Names the inner loop adapts (head names always; backbone too unless ANIL)."""
        names = [k for k, _ in self.model.named_parameters()]
        if self.algo.trainable == "head":
            return [k for k in names if k.startswith("head.")]
        return names

    def inner_lr(self) -> LRSpec:
        """The inner learning rates in `pipeline.meta.inner` form (differentiable when learned)."""
        names = self.adapted_names()
        if self.algo.learned_lr == "per_param":
            return {k: self.lr_params[_lr_key(k)] for k in names}
        if self.algo.learned_lr == "per_layer_step":
            return [
                {k: self.lr_params[f"s{i}__{_lr_key(k)}"] for k in names}
                for i in range(max(self.inner.steps, 1))
            ]
        return float(self.inner.lr)

    def second_order_at(self, progress: float) -> bool:
        return self.algo.second_order and progress >= self.algo.derivative_order_anneal

    # ---------------------------------------------------------------------------------- objective
    def task_mode(self, device: torch.device, progress: float = 1.0) -> str:
        """How the tasks of a meta-batch are run: `vmap` (one batched program; GPUs), `loop`, or `threads`
        (tasks spread over CPU worker threads, one intra-op thread each). `auto` = vmap on CUDA, threads on
        a multi-threaded CPU, else loop. Checkpointed second order cannot run under vmap (loop instead)."""
        mode = self.inner.tasks
        if mode == "auto":
            if device.type == "cuda":
                mode = "vmap"
            else:
                mode = "threads" if torch.get_num_threads() > 1 else "loop"
        if (
            mode == "vmap"
            and self.algo.is_gradient
            and (self.inner.checkpoint or self.model.head_policy == "proto")
            and self.second_order_at(progress)
        ):
            # Second order through a proto head under vmap disagrees with the looped (and a hand-written
            # autograd) meta-gradient by O(1) with GroupNorm (first order agrees to 1e-5; measured,
            # tests/meta/test_algorithms.py); until that is understood, those tasks run looped.
            mode = "loop"
        return mode

    def _task_fn(self, net: FewShotNet, n_way: int, progress: float) -> Callable[..., tuple[Tensor, Tensor]]:
        """(x_s, y_s, x_q, y_q) of ONE task -> (query loss, accuracy), run through `net`'s structure with the
        meta-parameters of `self.model` (so a replica of the network can run it in another thread)."""
        meta = self.model.meta_parameters()
        if not self.algo.is_gradient:
            return lambda xs, ys, xq, yq: protonet.episode_loss(net, meta, xs, ys, xq, yq, n_way)
        lr = self.inner_lr()
        so = self.second_order_at(progress)
        steps = self.inner.steps
        weights = (
            multi_step_weights(steps, progress, self.algo.msl_anneal) if self.algo.multi_step_loss else []
        )
        trainable = None if self.algo.trainable == "all" else self.adapted_names()
        ck = self.inner.checkpoint and so

        def fn(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
            p0 = net.task_params(n_way, meta, support=(xs, ys))
            traj = adapt(
                net,
                p0,
                xs,
                ys,
                steps=steps,
                lr=lr,
                second_order=so,
                trainable=trainable,
                checkpoint=ck,
                trajectory=True,
                clip_grad=self.inner.clip_grad,
            )
            assert isinstance(traj, list)
            logits = forward(net, traj[-1], xq)  # (n_q, n_way)
            loss = F.cross_entropy(logits, yq)
            if weights:
                # multi-step loss: the query loss after every inner step, weighted (last one above).
                loss = weights[-1] * loss
                for w, p in zip(weights[:-1], traj[1:-1]):
                    loss = loss + w * F.cross_entropy(forward(net, p, xq), yq)
            acc = (logits.argmax(-1) == yq).float().mean()
            return loss, acc

        return fn

    def meta_loss(
        self, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor, n_way: int, progress: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Mean query loss and accuracy over a meta-batch, differentiable (vmap or loop over tasks).

        x_s (T, n_way*k, C, *spatial), y_s (T, n_way*k), x_q (T, n_way*q, C, *spatial), y_q (T, n_way*q);
        `progress` in [0, 1] drives MAML++'s annealing (deterministic in the step, so resume is exact).
        """
        fn = self._task_fn(self.model, n_way, progress)
        if self.task_mode(x_s.device, progress) == "vmap":
            losses, accs = vmap(fn)(x_s, y_s, x_q, y_q)
        else:
            outs = [fn(x_s[t], y_s[t], x_q[t], y_q[t]) for t in range(x_s.shape[0])]
            losses = torch.stack([o[0] for o in outs])
            accs = torch.stack([o[1] for o in outs])
        return losses.mean(), accs.mean()

    def meta_backward(
        self, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor, n_way: int, progress: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """`meta_loss` + backward: accumulates the meta-gradient into `.grad`; returns (loss, acc) detached.

        In `threads` mode each task's meta-gradient is computed in a worker thread with its own replica of
        the network (`functional_call` swaps a module's tensors in place, so threads cannot share one) and
        one intra-op thread; the per-task gradients are summed in task order, so the result does not depend
        on thread scheduling (bit-identical reruns, as resume needs).
        """
        if self.task_mode(x_s.device, progress) != "threads":
            loss, acc = self.meta_loss(x_s, y_s, x_q, y_q, n_way, progress)
            loss.backward()
            return loss.detach(), acc.detach()
        params = [p for p in self.parameters() if p.requires_grad]
        n_tasks = x_s.shape[0]
        workers = torch.get_num_threads()
        local = self._replicas

        def one(t: int) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
            torch.set_num_threads(1)
            net = getattr(local, "net", None)
            if net is None:
                net = local.net = copy.deepcopy(self.model)
            loss, acc = self._task_fn(net, n_way, progress)(x_s[t], y_s[t], x_q[t], y_q[t])
            grads = torch.autograd.grad(loss / n_tasks, params, allow_unused=True)
            return loss.detach(), acc.detach(), grads

        try:
            outs = list(_pool(workers).map(one, range(n_tasks)))
        finally:
            torch.set_num_threads(workers)
        for i, p in enumerate(params):
            gs: list[Tensor] = [g for g in (o[2][i] for o in outs) if g is not None]
            if not gs:
                continue
            total = gs[0].clone()
            for g in gs[1:]:
                total += g
            p.grad = total if p.grad is None else p.grad + total
        return torch.stack([o[0] for o in outs]).mean(), torch.stack([o[1] for o in outs]).mean()

    # ---------------------------------------------------------------------------------- test time
    def method(self, steps: int | None = None) -> FewShotMethod:
        """This learner as a `FewShotMethod` (a detached snapshot of the current meta-parameters)."""
        if not self.algo.is_gradient:
            return ProtoNetMethod(self.model, name=self.algo.name)
        lr = detach_lr(self.inner_lr())
        n = (
            steps
            if steps is not None
            else (self.inner.eval_steps if self.inner.eval_steps is not None else self.inner.steps)
        )
        return GradientMethod(
            self.model,
            steps=n,
            lr=lr,
            trainable=self.algo.trainable,
            name=self.algo.name,
            clip_grad=self.inner.clip_grad,
        )
