"""`EpisodesConfig`: the `episodes:` section of a task suite (`tasks/<suite>.yaml`).

Structure and value ranges are validated here, up front. Condition *names* can only be checked once the
scan index of the ingest run is read, so `pipeline.episodes.split.validate_condition_names` checks them in
the stage (unknown names fail with the valid names and the closest match).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import StrictModel

Kind = Literal["binary", "n_way"]
Multilabel = Literal["exclusive_in_episode", "single_finding"]


# Scan-index columns that cannot define a group: keys are per scan/patient (an episode within one
# patient could hold one scan), labels are the classes themselves, store_index is a row number.
UNGROUPABLE = ("scan_key", "patient_key", "study_key", "series_key", "file_key", "labels", "store_index")


def _both_kinds() -> list[Kind]:
    return ["binary", "n_way"]


class SplitConfig(StrictModel):
    """Which conditions are common (meta-train), validation, and rare (meta-test).

    Explicit lists win. A condition that is not listed anywhere is assigned by rule, on its number of
    patients in the whole scan index: fewer than `rare_below_patients` -> rare; else fewer than
    `validation_below_patients` -> validation; else common. Without a matching rule it is common.
    `exclude` lists conditions that are never used (their scans still count as that patient's scans).
    """

    common: list[str] = Field(default_factory=list, description="conditions to meta-train on (train pool)")
    validation: list[str] = Field(default_factory=list, description="conditions of the validation episodes")
    rare: list[str] = Field(default_factory=list, description="conditions of the test episodes (meta-test)")
    exclude: list[str] = Field(default_factory=list, description="conditions never used as a class")
    rare_below_patients: int | None = Field(
        default=None, ge=1, description="an unlisted condition with fewer patients than this is rare"
    )
    validation_below_patients: int | None = Field(
        default=None, ge=1, description="else, with fewer patients than this, a validation condition"
    )

    @model_validator(mode="after")
    def _one_split_per_condition(self) -> SplitConfig:
        seen: dict[str, str] = {}
        for key in ("common", "validation", "rare", "exclude"):
            for name in getattr(self, key):
                if name in seen:
                    raise ValueError(
                        f"condition '{name}' is listed in both split.{seen[name]} and split.{key}; "
                        "a condition belongs to one split only"
                    )
                seen[name] = key
        if (
            self.rare_below_patients is not None
            and self.validation_below_patients is not None
            and self.validation_below_patients <= self.rare_below_patients
        ):
            raise ValueError(
                f"validation_below_patients ({self.validation_below_patients}) must be larger than "
                f"rare_below_patients ({self.rare_below_patients}): validation takes the conditions between them"
            )
        return self


class NormalFraction(StrictModel):
    """How patients without any finding of a used condition are shared between the pools."""

    train: float = Field(default=0.7, ge=0.0, le=1.0, description="share of those patients in the train pool")
    val: float = Field(default=0.1, ge=0.0, le=1.0, description="share in the val pool")
    test: float = Field(default=0.2, ge=0.0, le=1.0, description="share in the test pool")

    @model_validator(mode="after")
    def _sums_to_one(self) -> NormalFraction:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"normal_fraction train + val + test must sum to 1, got {total:g}")
        return self


class EpisodesConfig(StrictModel):
    """Few-shot task suite: condition split, episode kinds and sizes, fixed episode counts, seed."""

    split: SplitConfig = Field(default_factory=SplitConfig)
    kinds: list[Kind] = Field(
        default_factory=_both_kinds,
        min_length=1,
        description="binary: one condition vs normal (classes [condition, normal_label]); n_way: n_way "
        "conditions against each other (normal is not a class)",
    )
    n_way: int = Field(default=3, ge=2, description="classes of an n_way episode")
    k_shot: int | list[int] = Field(
        default_factory=lambda: [1, 5],
        description="support scans per class; a list: the fixed val/test files hold episodes for every k, "
        "the train sampler mixes them",
    )
    q_query: int = Field(default=15, ge=1, description="query scans per class")
    val_episodes: int = Field(
        default=100, ge=0, description="fixed validation episodes per (kind, k_shot) combination"
    )
    test_episodes: int = Field(
        default=600,
        ge=1,
        description="fixed test episodes per (kind, k_shot); 600 give a 95% CI of about +-4%",
    )
    seed: int = Field(default=0, ge=0, description="seed of the split and of the fixed episodes")
    multilabel: Multilabel = Field(
        default="exclusive_in_episode",
        description="exclusive_in_episode: a scan counts as C in an episode only if C is its only finding "
        "among that episode's classes; single_finding: only scans with exactly one finding overall are used",
    )
    on_insufficient: Literal["fail", "drop"] = Field(
        default="fail",
        description="a condition with too few patients in its pool: fail with a table, or drop it with a warning",
    )
    normal_fraction: NormalFraction = Field(default_factory=NormalFraction)
    group_by: str | None = Field(
        default=None,
        description="a scan-index column (e.g. alphabet, body_part from labels.group_columns, or modality) "
        "whose one value every scan of an episode shares (docs/tasks.md, 'Episodes within a group'); "
        "null: no grouping",
    )

    @field_validator("group_by")
    @classmethod
    def _group_column(cls, v: str | None) -> str | None:
        if v is not None and v in UNGROUPABLE:
            raise ValueError(
                f"group_by '{v}' is a key or label column of the scan index; group by a column every "
                "episode's scans should share, e.g. modality or a labels.group_columns column of the manifest"
            )
        return v

    @field_validator("kinds")
    @classmethod
    def _unique_kinds(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"kinds has duplicates: {v}")
        return v

    @field_validator("k_shot")
    @classmethod
    def _positive_shots(cls, v: int | list[int]) -> int | list[int]:
        shots = [v] if isinstance(v, int) else v
        if not shots:
            raise ValueError("k_shot must be a positive integer or a non-empty list of them")
        bad = [k for k in shots if k < 1]
        if bad:
            raise ValueError(f"k_shot values must be >= 1, got {bad}")
        return v

    @property
    def k_shots(self) -> list[int]:
        """The k_shot values, sorted and without duplicates."""
        return sorted({self.k_shot} if isinstance(self.k_shot, int) else set(self.k_shot))

    @property
    def max_patients_per_class(self) -> int:
        """Distinct patients one class of the largest episode needs (one scan per patient per episode)."""
        return max(self.k_shots) + self.q_query
