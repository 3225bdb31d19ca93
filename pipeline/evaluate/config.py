"""`evaluate:` section of a task suite: which methods, how many episodes, the validation grids."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import StrictModel


def _positive_unique(values: list[int] | list[float], name: str) -> None:
    if not values:
        raise ValueError(f"{name} must list at least one candidate")
    if any(v <= 0 for v in values):
        raise ValueError(f"{name} candidates must be > 0, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} lists a candidate twice: {values}")


class MetaSearchConfig(StrictModel):
    """Test-time knobs of the meta-trained methods, chosen on validation episodes."""

    # Candidate numbers of inner steps at test time for gradient-based meta-methods; null = only the
    # number they were meta-trained with. ProtoNet has no test-time hyper-parameter.
    steps: list[int] | None = Field(
        default=None, description="test-time inner steps to choose from; null: as meta-trained"
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            _positive_unique(v, "meta.steps")
        return v


class PretrainConfig(StrictModel):
    """The traditional classifier: the meta-model's backbone trained with plain cross-entropy on every
    single-finding scan (and normal) of the meta-train pool."""

    # Trained to convergence by a held-out criterion, not for a fixed count: after every epoch the loss on
    # the held-out "stopping" patients is measured; training stops after `patience` epochs without a new
    # best (by more than `min_delta`) and the best epoch's weights are kept. `max_epochs` only bounds it.
    max_epochs: int = Field(default=40, ge=1, description="upper bound on the epochs")
    patience: int = Field(
        default=4, ge=1, description="epochs without a new best held-out loss before stopping"
    )
    min_delta: float = Field(default=1e-3, ge=0, description="what counts as a new best")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="Adam weight decay")
    batch_size: int = Field(default=64, ge=2, description="images per training batch")
    # Cap on the number of training images (a seeded, class-stratified subsample); null = all.
    max_images: int | None = Field(default=None, ge=2, description="cap on the training images; null: all")
    # Held-out fraction of train-pool PATIENTS (never test data), split in two halves: one decides when to
    # stop, the other reports the classifier's own accuracy and macro AUC (the study's positive control),
    # so the reported numbers are not the ones training was stopped on. 0 = no hold-out: max_epochs run.
    holdout_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=0.6,
        description="held-out share of train-pool patients (stop / report halves)",
    )


HEAD_INIT_DOC = (
    "the head each support set starts from: proto = the prototypical classifier of the support features "
    "(the start meta-learned head: proto uses), zero = zeros (docs/evaluation.md, 'Stable MAML settings')"
)


class FinetuneConfig(StrictModel):
    """Fine-tuning the pretrained classifier on each episode's support set (a fresh per-episode head)."""

    enabled: bool = Field(default=True, description="evaluate this baseline")
    head_init: Literal["proto", "zero"] = Field(default="proto", description=HEAD_INIT_DOC)
    modes: list[Literal["head", "whole"]] = Field(
        default=["head", "whole"], description="fine-tune the head only, the whole network, or both (chosen)"
    )
    steps: list[int] = Field(default=[10, 25], description="fine-tuning steps to choose from")
    lrs: list[float] = Field(default=[0.01, 0.1], description="learning rates to choose from")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @model_validator(mode="after")
    def _grids(self) -> FinetuneConfig:
        _positive_unique(self.steps, "finetune.steps")
        _positive_unique(self.lrs, "finetune.lrs")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"finetune.modes must list 'head' and/or 'whole' once each, got {self.modes}")
        return self


class ScratchConfig(StrictModel):
    """Training the same backbone from a random initialization on each support set alone."""

    enabled: bool = Field(default=True, description="evaluate this baseline")
    head_init: Literal["proto", "zero"] = Field(default="proto", description=HEAD_INIT_DOC)
    steps: list[int] = Field(default=[25, 50], description="training steps to choose from")
    lrs: list[float] = Field(default=[0.01, 0.1], description="learning rates to choose from")

    @model_validator(mode="after")
    def _grids(self) -> ScratchConfig:
        _positive_unique(self.steps, "scratch.steps")
        _positive_unique(self.lrs, "scratch.lrs")
        return self


class BootstrapConfig(StrictModel):
    """The patient-level (cluster) bootstrap behind the report's patient intervals."""

    resamples: int = Field(
        default=2000,
        ge=200,
        le=100_000,
        description="bootstrap resamples of the distinct query patients per episode group; the 95% "
        "percentile intervals of accuracy and of paired differences are read from them",
    )
    seed: int = Field(
        default=0,
        ge=0,
        description="seed of the patient resampling (combined with the group name, so each episode group "
        "gets its own stream and every method of a group shares it: paired differences)",
    )


class EvaluateConfig(StrictModel):
    # Folder names under the meta-train run's models/ to evaluate; null = every trained method.
    methods: list[str] | None = Field(default=None, description="methods under models/; null: all trained")
    # One evaluation per seed (pretraining of the traditional classifier, scratch initializations);
    # reported as mean and spread across seeds. Episodes stay the fixed ones of the episodes run.
    seeds: list[int] = Field(default=[0], description="one evaluation per seed, reported as mean and spread")
    # Cap on the number of test episodes per (kind, k_shot) group; null = all of them.
    max_episodes: int | None = Field(default=None, ge=1, description="test episodes per group; null: all")
    # Validation episodes per (kind, k_shot) group used to choose hyper-parameters.
    val_episodes: int = Field(default=50, ge=1, description="validation episodes per group for the choices")
    # Adaptation curves: inner steps 0..curve_steps and k' = 1..k support scans per class, measured on
    # the first `curve_episodes` test episodes of each group.
    curve_steps: int = Field(default=10, ge=1, description="adaptation curves: inner steps 0..curve_steps")
    curve_episodes: int = Field(default=100, ge=0, description="adaptation curves: test episodes per group")
    ece_bins: int = Field(default=10, ge=2, le=100, description="bins of the expected calibration error")
    device: str = Field(default="auto", description="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "CPU threads: episodes run on this many task threads with one torch thread each, the "
            "baselines' pretraining on this many torch threads; null = the CPUs this process may use"
        ),
    )
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    meta: MetaSearchConfig = Field(default_factory=MetaSearchConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    scratch: ScratchConfig = Field(default_factory=ScratchConfig)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds must list at least one seed, e.g. [0]")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds lists a seed twice: {v}")
        if any(s < 0 for s in v):
            raise ValueError(f"seeds must be >= 0, got {v}")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"methods must be null (all) or a non-empty list without repeats, got {v}")
        return v
