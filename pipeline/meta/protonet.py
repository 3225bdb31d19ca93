"""Prototypical networks (Snell et al. 2017) on the same backbone and the same episodes as MAML.

The embedding is the backbone's feature vector (the head is unused). Logits are negative squared
Euclidean distances to the class means of the support embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from pipeline.meta.models import FewShotNet


def embed(model: FewShotNet, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """(n, C, *spatial) → (n, F) with `params` (functional, so it vmaps over tasks)."""
    bb = {k[len("backbone.") :]: v for k, v in params.items() if k.startswith("backbone.")}
    return functional_call(model.backbone, bb, (x,))


def prototypes(z: Tensor, y: Tensor, n_way: int) -> Tensor:
    """Class means: z (n, F), y (n,) in [0, n_way) → (n_way, F). Written with one_hot so it vmaps."""
    onehot = F.one_hot(y, n_way).to(z.dtype)  # (n, n_way)
    counts = onehot.sum(0).clamp_min(1.0)  # (n_way,)
    return (onehot.T @ z) / counts[:, None]


def proto_logits(z: Tensor, protos: Tensor) -> Tensor:
    """-‖z - c_k‖²: z (m, F), protos (n_way, F) → (m, n_way)."""
    return -((z[:, None, :] - protos[None, :, :]) ** 2).sum(-1)


def episode_loss(
    model: FewShotNet,
    params: Mapping[str, Tensor],
    x_s: Tensor,
    y_s: Tensor,
    x_q: Tensor,
    y_q: Tensor,
    n_way: int,
) -> tuple[Tensor, Tensor]:
    """ProtoNet loss and accuracy of one episode (support and query embedded in one forward pass)."""
    z = embed(model, params, torch.cat([x_s, x_q]))
    z_s, z_q = z[: x_s.shape[0]], z[x_s.shape[0] :]
    logits = proto_logits(z_q, prototypes(z_s, y_s, n_way))
    loss = F.cross_entropy(logits, y_q)
    acc = (logits.argmax(-1) == y_q).float().mean()
    return loss, acc
