"""`adapt:` section of a suite file: which support set, which condition, how to adapt, where to register."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from pipeline.config import StrictModel
from pipeline.names import registry_slug

# MLflow's own rules for alias names (mlflow.utils.validation): word characters and '-', and not
# a version-like 'v3'. 'latest' is reserved by MLflow for "the newest version" and resolves without
# being set, so it is accepted here and handled by the registry helper.
_ALIAS_RE = re.compile(r"^[\w\-]+$")
_VERSION_LIKE_RE = re.compile(r"^[vV]\d+$")


def slugify(text: str) -> str:
    """'Pleural Thickening' -> 'pleural-thickening' (registry names stay readable and URL-safe); the one
    rule lives in pipeline/names.py (non-ASCII and punctuation-only names get a hash, never collide)."""
    return registry_slug(text)


class AdaptConfig(StrictModel):
    """How to adapt the meta-model to a new condition from a few labelled scans."""

    # A folder with one subfolder per class (`<Condition>/`, `No Finding/`), or a label CSV with the
    # columns `path,label` (relative paths resolve against the CSV's folder).
    support: Path
    # Optional labelled query set (same layout) to measure accuracy, AUC, sensitivity, specificity.
    query: Path | None = None
    # The positive class (a class folder / CSV label). None: the one class that is not the normal label.
    condition: str | None = None
    # Which meta-learned method of the meta-train run to adapt (a folder under its `models/`).
    # None: the run's primary method (the only one, or the first one in its config).
    method: str | None = None
    # Inner-loop steps and learning rate; None = the meta-model's own (as meta-trained).
    steps: int | None = Field(default=None, ge=0, le=10_000)
    lr: float | None = Field(default=None, gt=0.0, le=10.0)
    # Fewest readable scans a class needs after unreadable ones are dropped.
    min_per_class: int = Field(default=1, ge=1)
    # Registry name of the adapted model; None = `fewscan-<condition>` (slugified).
    register_name: str | None = None
    alias: str = "latest"
    # Seeds anything random in adaptation (a freshly initialised head, if the method has one).
    seed: int = 0
    # Scans per forward pass when scoring the query set.
    batch_size: int = Field(default=64, ge=1)
    # CPU threads for torch during adaptation and scoring (restored afterwards); None = torch's default.
    # A 5-shot adaptation is a few tiny batches: on a busy CPU, 1 thread avoids intra-op contention
    # (measured 0.5 s vs 1.3-4.2 s with 2 threads at load 11 on 2 cores; benchmarks/RESULTS.md (adapt)).
    threads: int | None = Field(default=None, ge=1, le=256)
    # The salt of the scan/patient keys: ingest's salt file (kept outside MLflow), so keys are comparable.
    salt_file: Path = Path(".fewscan/salt")
    # Where the local-only report with clear file paths goes (never uploaded).
    local_report_dir: Path = Path(".fewscan/reports")

    @field_validator("alias")
    @classmethod
    def _alias_ok(cls, v: str) -> str:
        if not _ALIAS_RE.match(v) or _VERSION_LIKE_RE.match(v):
            raise ValueError(
                f"alias '{v}' is not a valid MLflow alias: use letters, digits, '_' or '-', and not a "
                "version-like name such as 'v3' (e.g. 'latest', 'champion', 'candidate')"
            )
        return v

    @field_validator("register_name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "/" in v or ":" in v or "@" in v):
            raise ValueError(f"register_name '{v}' must be non-empty and contain no '/', ':' or '@'")
        return v

    def registry_name(self, condition: str) -> str:
        return self.register_name or f"fewscan-{slugify(condition)}"
