"""`adapt:` section of a suite file: which support set, which condition, how to adapt, where to register."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pipeline.config import StrictModel
from pipeline.names import adapted_model_name, registry_name_problem

# MLflow's own rules for alias names (mlflow.utils.validation): word characters and '-', and not
# a version-like 'v3'. 'latest' is reserved by MLflow for "the newest version" and resolves without
# being set, so it is accepted here and handled by the registry helper.
_ALIAS_RE = re.compile(r"^[\w\-]+$")
_VERSION_LIKE_RE = re.compile(r"^[vV]\d+$")


class AdaptConfig(StrictModel):
    """How to adapt the meta-model to a new condition from a few labelled scans."""

    # A folder with one subfolder per class (`<Condition>/`, `No Finding/`), or a label CSV with the
    # columns `path,label` (relative paths resolve against the CSV's folder).
    support: Path = Field(
        description="labelled scans: one folder per class, or a CSV with columns path,label"
    )
    # Optional labelled query set (same layout) to measure accuracy, AUC, sensitivity, specificity.
    query: Path | None = Field(default=None, description="labelled scans to measure the adapted model on")
    # The positive class (a class folder / CSV label). None: the one class that is not the normal label.
    condition: str | None = Field(default=None, description="the positive class; null: the non-normal class")
    # Which meta-learned method of the meta-train run to adapt (a folder under its `models/`).
    # None: the run's primary method (the only one, or the first one in its config).
    method: str | None = Field(default=None, description="the method under models/; null: the primary one")
    # Inner-loop steps and learning rate; None = the meta-model's own: its `inner.eval_steps`, the number of
    # steps meta-train validated it with (else `inner.steps`), and its (learned) inner learning rate.
    steps: int | None = Field(
        default=None, ge=0, le=10_000, description="inner steps; null: the meta-model's validated eval_steps"
    )
    lr: float | None = Field(
        default=None, gt=0.0, le=10.0, description="inner learning rate; null: the meta-model's (learned) one"
    )
    # The inner loop's support loss: true = class-balanced (every class weighs the same however many scans
    # it has: the mean over classes of each class's mean cross-entropy), false = plain cross-entropy, which an
    # imbalanced support set (5 condition, 20 normal scans) pulls towards the majority class. None = chosen
    # with the threshold: plain with the "support" threshold, which re-centres on the model's own scores and
    # so absorbs that pull (class-balanced measured no better there, worse on imbalanced synthetic sets),
    # class-balanced with "argmax" or a given probability, which do not (docs/adapt.md, "Class balance").
    # Recorded in the model card.
    balanced_loss: bool | None = Field(
        default=None,
        description="class-balanced support loss; null: plain with threshold 'support', else balanced "
        "(docs/adapt.md, 'Class balance')",
    )
    # How a binary model turns p(condition) into a predicted class (stored in the model, applied by predict
    # and serving; docs/adapt.md, "Decision threshold"): "support" (halfway, in log-odds, between the mean
    # scores of the two classes' support scans: in-sample, optimistic, and measured by cv_folds), "argmax"
    # (0.5), or a probability. Models of more than two classes predict the argmax.
    threshold: Literal["support", "argmax"] | float = Field(
        default="support",
        description="a binary model's decision on p(condition): support (from the support scans' scores), "
        "argmax (0.5), or a probability (docs/adapt.md, 'Decision threshold')",
    )
    # The rule's balanced accuracy, sensitivity and specificity on held-out support scans, each predicted by
    # a model adapted without it: leave-one-out up to this many scans, else this many class-stratified
    # folds (each one more adaptation); 0 = no estimate.
    cv_folds: int = Field(
        default=10, ge=0, le=100, description="held-out estimate on the support scans: folds (0: none)"
    )
    # Fewest readable scans a class needs after unreadable ones are dropped.
    min_per_class: int = Field(default=1, ge=1, description="fewest readable support scans a class needs")
    # Registry name of the adapted model; None = `fewscan-<suite>-<condition>-<hash>`, unique per suite and
    # condition (pipeline/names.py `adapted_model_name`; docs/adapt.md, "Registered name").
    register_name: str | None = Field(
        default=None, description="registry name; null: fewscan-<suite>-<condition>-<hash>"
    )
    alias: str = Field(default="latest", description="alias moved to the new version when the run finishes")
    # Seeds anything random in adaptation (a freshly initialised head, if the method has one).
    seed: int = Field(default=0, description="seeds anything random in adaptation")
    # Scans per forward pass when scoring the query set.
    batch_size: int = Field(default=64, ge=1, description="scans per forward pass when scoring")
    # CPU threads for torch during adaptation and scoring (restored afterwards); None = the CPUs this process
    # may use (pipeline/cpus.py: FEWSCAN_CPUS, OMP_NUM_THREADS, affinity, cgroup quota).
    # A 5-shot adaptation is a few tiny batches: on a busy CPU, 1 thread avoids intra-op contention
    # (measured 0.5 s vs 1.3-4.2 s with 2 threads at load 11 on 2 cores; benchmarks/RESULTS.md (adapt)).
    threads: int | None = Field(
        default=None, ge=1, le=256, description="torch CPU threads; null: the CPUs this process may use"
    )
    # The salt of the scan/patient keys: ingest's salt file (kept outside MLflow), so keys are comparable.
    salt_file: Path = Field(default=Path(".fewscan/salt"), description="ingest's salt file (never uploaded)")
    # Where the local-only report with clear file paths goes (never uploaded).
    local_report_dir: Path = Field(
        default=Path(".fewscan/reports"), description="local report with clear file paths (never uploaded)"
    )

    @field_validator("alias")
    @classmethod
    def _alias_ok(cls, v: str) -> str:
        if not _ALIAS_RE.match(v) or _VERSION_LIKE_RE.match(v):
            raise ValueError(
                f"alias '{v}' is not a valid MLflow alias: use letters, digits, '_' or '-', and not a "
                "version-like name such as 'v3' (e.g. 'latest', 'champion', 'candidate')"
            )
        return v

    @property
    def class_balanced(self) -> bool:
        """Whether the inner loop uses the class-balanced loss (see `balanced_loss`)."""
        return self.balanced_loss if self.balanced_loss is not None else self.threshold != "support"

    @field_validator("threshold")
    @classmethod
    def _threshold_ok(cls, v: str | float) -> str | float:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"threshold {v} is not a probability strictly between 0 and 1")
        return v

    @field_validator("register_name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        problem = registry_name_problem(v) if v is not None else None
        if problem:
            raise ValueError(
                f"register_name {v!r} is not a usable registered model name: {problem}; leave it out for the "
                "default fewscan-<suite>-<condition>-<hash>"
            )
        return v

    def registry_name(self, suite: str | None, condition: str) -> str:
        """`register_name` if given (the suite's own choice, shared by whoever gives the same one), else the
        name unique to this suite and condition."""
        return self.register_name or adapted_model_name(suite, condition)
