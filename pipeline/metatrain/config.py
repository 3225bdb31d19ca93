"""`MetaTrainConfig`: the `meta_train:` section of a task suite."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import StrictModel
from pipeline.meta.specs import METHODS, InnerConfig, MAMLPlusPlusConfig, ModelSpec


class OuterSection(StrictModel):
    """The outer (meta) optimizer: Adam with warmup + cosine decay, gradient-norm clipping."""

    steps: int = Field(default=300, ge=1, description="meta-batches (outer steps) per method")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate (after warmup)")
    schedule: Literal["cosine", "constant"] = Field(default="cosine", description="decay after warmup")
    warmup_steps: int = Field(default=10, ge=0, description="outer steps of linear warmup")
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1, description="cosine: the final lr as a share of lr")
    clip_grad: float | None = Field(default=10.0, gt=0, description="max gradient norm; null = no clipping")


class TrainEpisodeShape(StrictModel):
    """Shapes of the meta-training episodes (null = as the suite's episodes section)."""

    kinds: list[Literal["binary", "n_way"]] | None = Field(default=None, description="episode kinds")
    k_shot: list[int] | None = Field(default=None, description="support scans per class (mixed)")
    q_query: int | None = Field(default=None, ge=1, description="query scans per class")
    n_way: int | None = Field(
        default=None,
        ge=2,
        description="may differ from the test n_way, as in the literature (docs/tasks.md, 'Training "
        "episodes'); the fixed val/test episodes keep the suite's",
    )
    rotations: list[Literal[0, 90, 180, 270]] | None = Field(
        default=None,
        description="class augmentation for benchmark reproduction: each listed rotation of a training "
        "condition is a class of its own in n_way episodes (docs/tasks.md, 'Rotated classes'); not for "
        "medical images",
    )

    @field_validator("rotations")
    @classmethod
    def _rotations(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"rotations must list distinct angles among 0, 90, 180, 270, got {v}")
        return v


class TrainEpisodes(TrainEpisodeShape):
    """Overrides of the episodes run's shapes for the meta-training episodes only (null = as the suite).
    Fewer query scans per class make each meta-batch cheaper; validation always uses the fixed episodes.
    `per_method` overrides these again for one method (e.g. ProtoNet trained with more ways)."""

    per_method: dict[str, TrainEpisodeShape] = Field(
        default_factory=dict, description="method name -> the keys above, for that method only"
    )


class MetaTrainConfig(StrictModel):
    """Meta-training of one or more methods on the episodes of an episodes run."""

    methods: list[str] = Field(
        default_factory=lambda: ["maml", "protonet"],
        min_length=1,
        description="methods to train; the first is the primary one (registered)",
    )
    model: ModelSpec = Field(default_factory=ModelSpec)
    inner: InnerConfig = Field(default_factory=InnerConfig)
    mamlpp: MAMLPlusPlusConfig = Field(default_factory=MAMLPlusPlusConfig)
    outer: OuterSection = Field(default_factory=OuterSection)
    meta_batch: int = Field(default=4, ge=1, description="tasks per outer step")
    train_episodes: TrainEpisodes = Field(default_factory=TrainEpisodes)
    val_every: int = Field(default=50, ge=1, description="validate on the fixed val episodes every N steps")
    val_episodes: int | None = Field(
        default=None,
        ge=1,
        description="use at most this many fixed val episodes (spread over kinds/k); null = all",
    )
    checkpoint_every: int = Field(default=50, ge=1, description="outer steps between checkpoints (--resume)")
    select: Literal["best", "last"] = Field(
        default="best", description="save the best-by-val or the last weights"
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="meta-training seeds: every method is trained once per seed (the first seed's model is "
        "the one registered and adapted); evaluate states every verdict across them, since one meta-training "
        "run can move a result as much as the difference between methods (docs/evaluation.md, 'Seeds')",
    )
    device: str = Field(default="auto", description="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    amp: bool = Field(default=True, description="bf16 autocast on CUDA (ignored on CPU)")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; null = available CPUs")
    register_as: str | None = Field(
        default=None, description="registered model name; default fewscan-<suite>-meta"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_seed(cls, data: object) -> object:
        # `seed: N` (the key before several seeds existed) still means a single meta-training seed
        if isinstance(data, dict) and "seed" in data:
            if "seeds" in data:
                raise ValueError("give `seeds: [..]` or the older `seed: N`, not both")
            data = {**data, "seeds": [data["seed"]]}
            del data["seed"]
        return data

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError(f"seeds must be distinct non-negative integers, got {v}")
        return v

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"methods has duplicates: {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MetaTrainConfig:
        stray = sorted(set(self.train_episodes.per_method) - set(self.methods))
        if stray:
            raise ValueError(
                f"train_episodes.per_method names {stray}, which are not in methods {self.methods}"
            )
        if self.inner.checkpoint and not self.inner.second_order:
            raise ValueError(
                "inner.checkpoint only applies to second order: set inner.second_order: true or drop it"
            )
        return self
