"""The `FewShotMethod` protocol (used by evaluate and adapt) and its implementations.

A method turns a labelled support set into an `Adapted` state, then gives class probabilities for new scans:

    method = meta_model.method()                   # or GradientMethod(model, params, steps=..., lr=...)
    adapted = method.fit(x_s, y_s, n_way=2)        # x_s (n, C, *spatial) float32, y_s (n,) int64 in [0, n_way)
    proba = method.predict_proba(adapted, x_q)     # (m, n_way), rows sum to 1

Every gradient-based method (MAML family, fine-tuning baselines, training from scratch) adapts through
the one inner loop `pipeline.meta.inner.adapt`; ProtoNet has no inner loop (class means of embeddings).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.meta.inner import LossFn, LRSpec, adapt, adapt_params, forward
from pipeline.meta.models import FewShotNet


@dataclass
class Adapted:
    """What `fit` learned from one support set. Tensors are detached; safe to keep and reuse."""

    n_way: int
    params: dict[str, Tensor] | None = None  # gradient methods: the adapted parameters (head (n_way, F))
    prototypes: Tensor | None = None  # ProtoNet: (n_way, F) class means of the support embeddings
    info: dict[str, float] = field(default_factory=dict)  # e.g. support loss before/after


@runtime_checkable
class FewShotMethod(Protocol):
    name: str

    def fit(self, x_s: Tensor, y_s: Tensor, n_way: int, steps: int | None = None) -> Adapted: ...

    def predict_proba(self, adapted: Adapted, x: Tensor) -> Tensor: ...


def _check_support(x_s: Tensor, y_s: Tensor, n_way: int) -> None:
    if x_s.shape[0] != y_s.shape[0]:
        raise ValueError(f"support has {x_s.shape[0]} images but {y_s.shape[0]} labels")
    if n_way < 1:
        raise ValueError(f"n_way must be >= 1, got {n_way}")
    if y_s.numel() and (int(y_s.min()) < 0 or int(y_s.max()) >= n_way):
        raise ValueError(f"support labels must lie in [0, {n_way}), got [{int(y_s.min())}, {int(y_s.max())}]")


def class_balanced_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy in which every class present in `y` weighs the same, however many scans it has: the
    mean over classes of each class's mean loss (weights 1/count). On a balanced support set it equals
    `F.cross_entropy`; on 5 condition scans and 20 normal ones the plain loss is minimised by leaning towards
    "normal", which is what collapses an adapted model onto the majority class (docs/adapt.md)."""
    counts = torch.bincount(y, minlength=logits.shape[-1]).to(logits.dtype)
    weight = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return F.cross_entropy(logits, y, weight=weight)


def _batched_proba(fn, x: Tensor, batch_size: int) -> Tensor:
    outs = [
        torch.softmax(fn(x[i : i + batch_size]).float(), dim=-1) for i in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(outs) if outs else torch.zeros(0, 0)


class GradientMethod:
    """Gradient-based adaptation from an initialization: MAML / FO-MAML / ANIL / Meta-SGD / MAML++ at
    test time, and the fine-tuning and from-scratch baselines.

    Args:
        model: the `FewShotNet` (structure; its own parameters are the default initialization).
        params: the initialization (meta-parameters by name); default: `model`'s current parameters.
        steps: default number of inner steps for `fit`.
        lr: inner learning rate(s), see `pipeline.meta.inner` (float, per-parameter, or per-step).
        trainable: "all" (every parameter), "head" (head only: ANIL, linear probing), or a set of names.
        name: reported name, e.g. "maml", "finetune-head".
        batch_size: prediction batch size (memory bound for large query sets / 3D volumes).
        loss_fn: the inner loop's support loss (logits, y) -> scalar; default plain cross-entropy. The adapt
            stage passes `class_balanced_cross_entropy` (docs/adapt.md).
    """

    def __init__(
        self,
        model: FewShotNet,
        params: Mapping[str, Tensor] | None = None,
        *,
        steps: int,
        lr: LRSpec,
        trainable: str | Collection[str] = "all",
        name: str = "maml",
        batch_size: int = 64,
        clip_grad: float | None = None,
        loss_fn: LossFn | None = None,
    ):
        self.model = model
        self.clip_grad = clip_grad
        self.loss_fn: LossFn = loss_fn or F.cross_entropy
        self.params = {k: v.detach() for k, v in (params or model.meta_parameters()).items()}
        self.steps, self.lr, self.name, self.batch_size = steps, lr, name, batch_size
        if trainable == "all":
            self.trainable: Collection[str] | None = None
        elif trainable == "head":
            self.trainable = FewShotNet.head_names()
        else:
            self.trainable = set(trainable)

    def fit(self, x_s: Tensor, y_s: Tensor, n_way: int, steps: int | None = None) -> Adapted:
        _check_support(x_s, y_s, n_way)
        n_steps = self.steps if steps is None else steps
        device = next(iter(self.params.values())).device
        x_s, y_s = x_s.to(device), y_s.to(device)
        with torch.enable_grad():
            p0 = self.model.task_params(n_way, self.params, support=(x_s, y_s))
            p = adapt_params(
                self.model,
                p0,
                x_s,
                y_s,
                steps=n_steps,
                lr=self.lr,
                second_order=False,
                trainable=self.trainable,
                clip_grad=self.clip_grad,
                loss_fn=self.loss_fn,
            )
        with torch.no_grad():
            before = float(self.loss_fn(forward(self.model, p0, x_s), y_s))
            after = float(self.loss_fn(forward(self.model, p, x_s), y_s))
        return Adapted(
            n_way=n_way,
            params={k: v.detach() for k, v in p.items()},
            info={"support_loss_before": before, "support_loss_after": after, "steps": float(n_steps)},
        )

    def fit_trajectory(self, x_s: Tensor, y_s: Tensor, n_way: int, steps: int) -> list[Adapted]:
        """The states after 0..steps inner steps of ONE adaptation run (steps + 1 of them): adaptation
        curves and per-step loss logs cost `steps` inner steps instead of one `fit` per step count.
        Same start, learning rates and trainable set as `fit`; the last state equals `fit(..., steps)`."""
        _check_support(x_s, y_s, n_way)
        device = next(iter(self.params.values())).device
        x_s, y_s = x_s.to(device), y_s.to(device)
        with torch.enable_grad():
            p0 = self.model.task_params(n_way, self.params, support=(x_s, y_s))
            traj = adapt(
                self.model,
                p0,
                x_s,
                y_s,
                steps=steps,
                lr=self.lr,
                second_order=False,
                trainable=self.trainable,
                trajectory=True,
                clip_grad=self.clip_grad,
                loss_fn=self.loss_fn,
            )
        assert isinstance(traj, list)
        return [Adapted(n_way=n_way, params={k: v.detach() for k, v in p.items()}) for p in traj]

    @torch.no_grad()
    def predict_proba(self, adapted: Adapted, x: Tensor) -> Tensor:
        if adapted.params is None:
            raise ValueError(
                f"{self.name}: this Adapted holds no parameters (was it made by another method?)"
            )
        device = next(iter(adapted.params.values())).device
        params = adapted.params
        return _batched_proba(lambda b: forward(self.model, params, b.to(device)), x, self.batch_size).cpu()


class ProtoNetMethod:
    """Prototypical networks (Snell et al. 2017): class = nearest class mean of embeddings, squared
    Euclidean distance; no inner loop, so `steps` is ignored."""

    def __init__(
        self,
        model: FewShotNet,
        params: Mapping[str, Tensor] | None = None,
        *,
        name: str = "protonet",
        batch_size: int = 64,
    ):
        self.model = model
        self.params = {k: v.detach() for k, v in (params or model.meta_parameters()).items()}
        self.name, self.batch_size = name, batch_size

    def _embed(self, x: Tensor) -> Tensor:
        from pipeline.meta.protonet import embed

        device = next(iter(self.params.values())).device
        return torch.cat(
            [
                embed(self.model, self.params, x[i : i + self.batch_size].to(device))
                for i in range(0, x.shape[0], self.batch_size)
            ]
        )

    @torch.no_grad()
    def fit(self, x_s: Tensor, y_s: Tensor, n_way: int, steps: int | None = None) -> Adapted:
        from pipeline.meta.protonet import prototypes

        _check_support(x_s, y_s, n_way)
        missing = sorted(set(range(n_way)) - set(y_s.tolist()))
        if missing:
            raise ValueError(
                f"protonet needs at least one support image per class; none for class(es) {missing}"
            )
        protos = prototypes(self._embed(x_s), y_s.to(self._device()), n_way)
        return Adapted(n_way=n_way, prototypes=protos)

    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @torch.no_grad()
    def predict_proba(self, adapted: Adapted, x: Tensor) -> Tensor:
        from pipeline.meta.protonet import proto_logits

        if adapted.prototypes is None:
            raise ValueError(
                f"{self.name}: this Adapted holds no prototypes (was it made by another method?)"
            )
        protos = adapted.prototypes
        return _batched_proba(lambda b: proto_logits(self._embed(b), protos), x, self.batch_size).cpu()
