"""The engine's configuration models, with no torch: which network, the inner loop, MAML++'s fixes.

They live apart from `models.py` and `algorithms.py` (which re-export them) so that validating a suite
imports pydantic only: `fewscan` checks a config and reports its errors before it imports torch or mlflow
(README, "Command line"; issue 18 item 3).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.config import StrictModel

NormPolicy = Literal["group", "instance", "layer", "batch_transductive", "none"]
HeadPolicy = Literal["shared", "zero", "proto"]
NORM_POLICIES: tuple[str, ...] = ("group", "instance", "layer", "batch_transductive", "none")


class ModelSpec(StrictModel):
    """Which network to build. Serialised verbatim into `meta_model.json`."""

    backbone: str = Field(
        default="conv4", description="'conv4', or a MONAI network class name, e.g. 'DenseNet121'"
    )
    filters: int = Field(default=32, ge=1, description="conv4: channels of every block")
    blocks: int = Field(default=4, ge=1, le=8, description="conv4: number of conv-norm-relu-pool blocks")
    pool: Literal["flatten", "avg"] = Field(
        default="flatten", description="conv4: flatten the last map, or average it"
    )
    norm: NormPolicy = Field(
        default="group",
        description="normalization layers; batch_transductive (BatchNorm on batch statistics) only to "
        "reproduce benchmarks: a scan's prediction then depends on its batch",
    )
    norm_groups: int = Field(
        default=8, ge=1, description="groups for norm=group (reduced to a divisor of the channels)"
    )
    head: HeadPolicy = Field(
        default="proto",
        description="the head's start for each task: shared (one meta-learned row for every class), zero "
        "(zeros), proto (the prototypical classifier of the support set; pipeline/meta/models.py)",
    )
    embed_dim: int = Field(
        default=64, ge=1, description="MONAI backbones: width of the feature vector the net outputs"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="MONAI backbones: constructor options")


METHODS: tuple[str, ...] = ("maml", "fomaml", "anil", "metasgd", "mamlpp", "protonet")


class InnerConfig(StrictModel):
    """The inner loop shared by the gradient-based methods."""

    steps: int = Field(default=3, ge=0, description="inner steps during meta-training")
    eval_steps: int | None = Field(
        default=None, ge=0, description="inner steps at adaptation/evaluation (default: steps)"
    )
    lr: float = Field(
        default=0.01,
        gt=0,
        description="inner learning rate (initial value when learned); scale ~ 1/feature size: 0.01 for Conv-4's "
        "512 flattened features at 64x64 (MAML paper, miniImageNet), ~0.1 for 64 features (32x32, 16 filters)",
    )
    second_order: bool = Field(
        default=False, description="full second-order meta-gradient for maml/metasgd/mamlpp/anil"
    )
    checkpoint: bool = Field(
        default=False, description="memory-bounded second order: recompute inner steps in backward"
    )
    clip_grad: float | None = Field(
        default=None,
        gt=0,
        description="clip each inner step's gradient to this norm (meta-training AND adaptation); null = off. "
        "Bounds the step when a large inner lr meets a few support scans (docs/evaluation.md, 'Stable MAML settings')",
    )
    tasks: Literal["auto", "vmap", "loop", "threads"] = Field(
        default="auto",
        description="how the tasks of a meta-batch run: auto (vmap on CUDA, CPU worker threads when torch has "
        "more than one thread, else a loop), vmap, loop, threads",
    )


class MAMLPlusPlusConfig(StrictModel):
    """MAML++ fixes (used by method `mamlpp`)."""

    multi_step_loss: bool = Field(default=True, description="query loss after every inner step, annealed")
    msl_anneal: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="fraction of training over which the multi-step "
        "loss weights move from uniform to the last step only (0.03/steps floor)",
    )
    derivative_order_anneal: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="fraction of training run first-order "
        "before switching to second order (if inner.second_order)",
    )
