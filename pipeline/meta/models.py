"""Backbones and the few-shot classifier wrapper.

Every model is a `FewShotNet`: a backbone that maps images to a feature vector, plus a linear head.

Head policy (why): meta-training sees binary and n-way episodes, and a rare condition may be tested with
another n_way again, so the head cannot have a fixed number of rows. Three choices, all independent of n_way:

- `shared` (UnicornMAML, Ye & Chao, ICLR 2022): the meta-learned head is ONE row `w` (1, F) and
  one bias `b` (1,). For an n-way task the initial head is `w` replicated n times, so the initial logits are
  equal for every class (no class is favoured by the arbitrary label order of an episode) and the inner
  loop moves each row apart. The gradient of the replicated rows flows back into `w` (summed over rows).
- `zero` (the "zeroing trick" of Kao et al., ICLR 2022): the head starts at zero for every task and is
  not meta-learned; only the backbone is.
- `proto` (default; Proto-MAML, Triantafillou et al., ICLR 2020): the head starts, for every task, at the linear
  form of the prototypical classifier on the support set: row c = 2·μ_c, bias c = −‖μ_c‖² (μ_c the mean
  support feature of class c), i.e. −‖f − μ_c‖² up to a term shared by all classes. Why: with a zero or
  shared head, features that share a large common component (post-ReLU features of images that are mostly
  the same anatomy) make a few small inner steps predict one class for every query, and first-order MAML
  then gets almost no signal for the backbone (its gradient scales with the tiny adapted head). The proto
  start is label-order invariant, is informative from step 0, and the inner loop fine-tunes it; the
  outer gradient flows through the prototypes even in first order. Needs the support set: `task_params`
  takes it. Not meta-learned (like `zero`).

Normalization policy (why): a single scan must be predictable alone (docs/ARCHITECTURE.md, principle 7). Policies:

- `group` (default): GroupNorm, no batch statistics at all; per-sample, so train == test behaviour.
- `instance`: GroupNorm with one group per channel (instance norm with affine parameters).
- `layer`: GroupNorm with one group (layer norm over C and space).
- `batch_transductive`: BatchNorm WITHOUT running statistics: every forward uses the statistics of the
  batch it is given (what the MAML paper did). Predictions then depend on the other scans in the batch,
  so a single scan is normalised over its own pixels only. Offered for comparison with the literature;
  logged as such, never the default.
- `none`: no normalization.
None of the policies keeps running statistics, which also makes the models safe under `torch.func.vmap`.

`FewShotNet.task_params(n_way, params)` builds the parameter dict that the inner loop adapts for one task;
it is differentiable w.r.t. the meta-parameters, so second-order MAML flows through the head replication.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.errors import ConfigError
from pipeline.meta.fastops import Conv2d2, GroupNorm2, MaxPoolReLU2, group_norm_pool_relu

# The configuration models live in specs.py (no torch, so a suite is validated before torch is imported);
# re-exported here, where the code that builds the networks has always found them.
from pipeline.meta.specs import NORM_POLICIES as NORM_POLICIES
from pipeline.meta.specs import HeadPolicy as HeadPolicy
from pipeline.meta.specs import ModelSpec as ModelSpec
from pipeline.meta.specs import NormPolicy as NormPolicy


# --------------------------------------------------------------------------------------------- norms
def _groups(policy: str, channels: int, groups: int) -> int:
    if policy == "instance":
        return channels
    if policy == "layer":
        return 1
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def norm_layer(policy: str, channels: int, spatial_dims: int, groups: int = 8) -> nn.Module:
    """A normalization module for `channels` channels under `policy` (see module docstring)."""
    if policy in ("group", "instance", "layer"):
        # GroupNorm2: nn.GroupNorm with a CPU-fast, analytically twice-differentiable path (fastops.py).
        return GroupNorm2(_groups(policy, channels, groups), channels, affine=True)
    if policy == "batch_transductive":
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        # track_running_stats=False: batch statistics in train AND eval mode, no buffers to update.
        return bn(channels, affine=True, track_running_stats=False)
    if policy == "none":
        return nn.Identity()
    raise ConfigError(f"unknown normalization policy '{policy}'; valid: {', '.join(NORM_POLICIES)}")


def apply_norm_policy(module: nn.Module, policy: str, groups: int = 8) -> nn.Module:
    """Replace every BatchNorm in `module` (e.g. a MONAI net) according to `policy`, in place.

    MONAI networks default to BatchNorm with running statistics, which both breaks `vmap` over tasks and
    makes a single-scan prediction depend on training-time batch statistics. Returns `module`.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            c = child.num_features
            dims = 3 if isinstance(child, nn.BatchNorm3d) else 2
            setattr(module, name, norm_layer(policy, c, dims, groups))
        else:
            apply_norm_policy(child, policy, groups)
    return module


# --------------------------------------------------------------------------------------------- conv4
class Conv4(nn.Module):
    """The Conv-4 backbone of Finn et al. 2017 (after Vinyals et al. 2016), 2D or 3D.

    `blocks` × [conv 3×3(×3), padding 1 → norm → ReLU → max-pool 2]. Output: (n, feat_dim).
    (Computed as norm → max-pool → ReLU, which is the same function: see `__init__`.)
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, ...],
        filters: int = 32,
        blocks: int = 4,
        norm: str = "group",
        norm_groups: int = 8,
        pool: str = "flatten",
    ):
        super().__init__()
        spatial_dims = len(image_size)
        if spatial_dims not in (2, 3):
            raise ConfigError(f"conv4 needs 2D or 3D images, got spatial size {tuple(image_size)}")
        conv = Conv2d2 if spatial_dims == 2 else nn.Conv3d
        layers: list[nn.Module] = []
        c = in_channels
        size = list(image_size)
        for _ in range(blocks):
            layers += [conv(c, filters, 3, padding=1), norm_layer(norm, filters, spatial_dims, norm_groups)]
            # Pool, then ReLU: max-pool and ReLU commute exactly (both monotone), and the ReLU then runs on a
            # quarter (2D) / an eighth (3D) of the elements, forward, backward and double backward alike.
            # One fused module (fastops.MaxPoolReLU2); the Identity keeps each block four modules long, so
            # the state-dict keys (features.0, .1, .4, .5, ...) are those of every earlier version.
            layers += [MaxPoolReLU2(), nn.Identity()]
            c = filters
            size = [s // 2 for s in size]
        if min(size) < 1:
            raise ConfigError(
                f"conv4 with {blocks} blocks halves the image {blocks} times; {tuple(image_size)} is too small "
                f"(use fewer blocks or larger images)"
            )
        self.features = nn.Sequential(*layers)
        self.pool = pool
        self.feat_dim = filters * (math.prod(size) if pool == "flatten" else 1)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        mods = list(self.features)
        for i in range(0, len(mods), 4):  # blocks of [conv, norm, pool+ReLU, Identity]
            conv, norm, pool = mods[i : i + 3]
            h = conv(h)
            # GroupNorm + pool + ReLU in one fused kernel where it applies (fastops); else module by module.
            # (On the fused path the norm and pool modules' forward hooks do not run; their parameters do.)
            h = group_norm_pool_relu(h, norm) if isinstance(norm, GroupNorm2) else pool(norm(h))
        # h: (n, filters, *size)
        if self.pool == "avg":
            return h.flatten(2).mean(-1)
        return h.flatten(1)


# --------------------------------------------------------------------------------------------- monai
def _monai_backbone(
    name: str, in_channels: int, spatial_dims: int, embed_dim: int, options: dict
) -> nn.Module:
    from monai.networks import nets

    cls = getattr(nets, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        known = sorted(n for n in dir(nets) if isinstance(getattr(nets, n), type) and n[0].isupper())
        raise ConfigError(
            f"unknown backbone '{name}'; valid: conv4 or a MONAI network, e.g. {', '.join(known[:25])}"
        )
    sig = inspect.signature(cls.__init__).parameters
    kw: dict[str, Any] = dict(options)
    kw.setdefault("spatial_dims", spatial_dims)
    for key in ("in_channels", "n_input_channels"):
        if key in sig:
            kw.setdefault(key, in_channels)
            break
    for key in ("out_channels", "num_classes"):
        if key in sig:
            kw.setdefault(key, embed_dim)
            break
    if "pretrained" in sig:
        # Never fetch weights: the machine has no network, and ImageNet weights are not what we meta-learn.
        kw["pretrained"] = False
    unknown = [k for k in kw if k not in sig]
    if unknown:
        raise ConfigError(
            f"backbone {name} has no option(s) {', '.join(unknown)}; valid: {', '.join(p for p in sig if p != 'self')}"
        )
    try:
        return cls(**kw)
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"cannot build backbone {name} with options {kw}: {err}") from None


class _Flatten(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


# --------------------------------------------------------------------------------------------- wrapper
class FewShotNet(nn.Module):
    """backbone (n, C, *spatial) → (n, F) features → linear head → (n, n_way) logits.

    The stored head holds one row (`shared`: the meta-learned row; `zero`: unused zeros). The number of
    classes is decided per task by `task_params(n_way)`; `forward` uses whatever head shape it is called
    with through `torch.func.functional_call`.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, head: str = "shared"):
        super().__init__()
        if head not in ("shared", "zero", "proto"):
            raise ConfigError(f"unknown head policy '{head}'; valid: shared, zero, proto")
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.head_policy = head
        self.head = nn.Linear(feat_dim, 1)
        if head in ("zero", "proto"):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            self.head.requires_grad_(False)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.backbone(x), self.head.weight, self.head.bias)

    def meta_parameters(self) -> dict[str, Tensor]:
        """The meta-learned tensors (what the outer optimizer updates), by name."""
        return {k: v for k, v in self.named_parameters() if v.requires_grad}

    def task_params(
        self,
        n_way: int,
        params: Mapping[str, Tensor] | None = None,
        support: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The parameters one n-way task starts from: head replicated (shared), zeroed (zero), or the
        prototypes of the `support` set (x_s, y_s) in linear form (proto; see the module docstring).

        Differentiable w.r.t. `params` (default: this module's parameters). Keys match `named_parameters`.
        """
        if n_way < 1:
            raise ValueError(f"n_way must be >= 1, got {n_way}")
        src = dict(params) if params is not None else dict(self.named_parameters())
        out = {k: v for k, v in src.items() if not k.startswith("head.")}
        if self.head_policy == "proto":
            if support is None:
                raise ValueError(
                    "head policy 'proto' starts each task from the support set: pass support=(x, y)"
                )
            x_s, y_s = support
            bb = {k[len("backbone.") :]: v for k, v in out.items() if k.startswith("backbone.")}
            feats = functional_call(self.backbone, bb, (x_s,))  # (n, F)
            onehot = F.one_hot(y_s, n_way).to(feats.dtype)  # (n, n_way)
            counts = onehot.sum(0).clamp_min(1.0)
            mu = (onehot.transpose(0, 1) @ feats) / counts[:, None]  # (n_way, F)
            out["head.weight"] = 2.0 * mu
            out["head.bias"] = -(mu * mu).sum(-1)
        elif self.head_policy == "shared":
            w, b = src["head.weight"], src["head.bias"]
            out["head.weight"] = w.expand(n_way, w.shape[-1])  # (n_way, F), all rows equal
            out["head.bias"] = b.expand(n_way)
        else:
            # zero head: not meta-learned (absent from meta_parameters), fresh zeros for every task
            ref = next(iter(out.values()), self.head.weight)
            out["head.weight"] = torch.zeros(n_way, self.feat_dim, dtype=ref.dtype, device=ref.device)
            out["head.bias"] = torch.zeros(n_way, dtype=ref.dtype, device=ref.device)
        return out

    @staticmethod
    def head_names() -> tuple[str, str]:
        return ("head.weight", "head.bias")


def build_model(spec: ModelSpec, in_channels: int, image_size: tuple[int, ...]) -> FewShotNet:
    """Build the network described by `spec` for images of (in_channels, *image_size), 2D or 3D."""
    image_size = tuple(int(s) for s in image_size)
    spatial_dims = len(image_size)
    backbone: nn.Module
    if spec.backbone.lower() == "conv4":
        conv4 = Conv4(
            in_channels, image_size, spec.filters, spec.blocks, spec.norm, spec.norm_groups, spec.pool
        )
        backbone, feat_dim = conv4, conv4.feat_dim
    else:
        net = _monai_backbone(spec.backbone, in_channels, spatial_dims, spec.embed_dim, spec.options)
        apply_norm_policy(net, spec.norm, spec.norm_groups)
        backbone = _Flatten(net)
        with torch.no_grad():
            feat_dim = int(backbone(torch.zeros(2, in_channels, *image_size)).shape[1])
    return FewShotNet(backbone, feat_dim, spec.head)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
