"""The data manifest (`data_manifests/<study>.yaml`): which files, which labels, how to preprocess.

Every key is documented in docs/ingest.md. Unknown keys fail (StrictModel), so a typo such as
`image_sise` is reported with the valid choices instead of being silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import StrictModel, load_yaml

Format = Literal["dicom", "nifti", "png", "jpeg", "npz"]
JoinKey = Literal["file_name", "relative_path", "sop_instance_uid", "study_instance_uid", "patient_id"]


class ScansConfig(StrictModel):
    root: Path
    formats: list[Format] = ["dicom", "nifti", "png", "jpeg", "npz"]  # pydantic copies mutable defaults
    # glob patterns (matched against the path relative to root) that are never read, e.g. "**/README*"
    exclude: list[str] = Field(default_factory=list)

    @field_validator("formats")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one format is needed (dicom, nifti, png, jpeg, npz)")
        return v


class LabelsConfig(StrictModel):
    # csv: a CSV/TSV table; folders: the first folder under scans.root names the condition;
    # npz: MedMNIST-style *_labels arrays inside the npz files, named by `names`;
    # none: no labels (scans only: an inventory, scans for `predict`, or to label later)
    source: Literal["csv", "folders", "npz", "none"] = "csv"
    path: Path | None = None
    delimiter: Literal["auto", ",", "\t", ";"] = "auto"
    join: JoinKey = "file_name"
    key_column: str | None = None  # column holding the join value; required for csv
    label_column: str | None = None  # required for csv (except format one_hot)
    separator: str = "|"  # multi-label separator inside label_column
    # csv: how a row names its conditions (docs/ingest.md, "Label layouts"): `separated` text in
    # label_column, a JSON/Python `list` string in label_column, or `one_hot` columns (label_columns)
    format: Literal["separated", "list", "one_hot"] = "separated"
    label_columns: list[str] | None = None  # one_hot: one column per condition, named as the condition
    # one_hot: what -1 (uncertain) and a blank cell mean; no default, the choice changes the labels
    uncertain: Literal["positive", "negative", "exclude"] | None = None
    blank: Literal["negative", "exclude"] | None = None
    patient_column: str | None = None  # hashed only, never stored in clear
    age_column: str | None = None  # kept as 5-year bins
    sex_column: str | None = None  # kept as M/F/O
    normal_label: str = "No Finding"
    names: list[str] | None = None  # npz: label index -> name
    # csv only: columns copied verbatim into the scan index, to group episodes by (episodes.group_by):
    # e.g. body part, or an alphabet. Kept in clear, so never a patient attribute (docs/ingest.md).
    group_columns: list[str] = Field(default_factory=list)
    npz_splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]

    @model_validator(mode="after")
    def _check(self) -> LabelsConfig:
        if self.source == "csv":
            need = ("path", "key_column") + (
                ("label_columns", "uncertain", "blank") if self.format == "one_hot" else ("label_column",)
            )
            missing = [k for k in need if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f"labels.source=csv with labels.format={self.format} needs labels.{', labels.'.join(missing)}"
                    + (
                        " (what -1 and blank cells mean: there is no default)"
                        if self.format == "one_hot"
                        else ""
                    )
                )
            if self.format == "one_hot" and self.label_column:
                raise ValueError(
                    "labels.format=one_hot reads labels.label_columns; remove labels.label_column"
                )
        if self.format != "one_hot" and (self.label_columns or self.uncertain or self.blank):
            raise ValueError(
                "labels.label_columns, labels.uncertain and labels.blank need labels.format: one_hot"
            )
        if self.format != "separated" and self.source != "csv":
            raise ValueError(f"labels.format={self.format} needs labels.source=csv")
        names = [self.normal_label, *(self.names or []), *(self.label_columns or [])]
        if any("|" in n for n in names):
            raise ValueError(
                "condition names (labels.normal_label, labels.names, labels.label_columns) must not contain '|': "
                "the scan index joins a scan's labels with it"
            )
        if self.source == "npz" and not self.names:
            raise ValueError("labels.source=npz needs labels.names (label index -> condition name)")
        if not self.separator:
            raise ValueError("labels.separator must not be empty")
        if self.group_columns:
            if self.source != "csv":
                raise ValueError(
                    "labels.group_columns needs labels.source=csv (the columns of the label table)"
                )
            taken = {
                getattr(self, k): k
                for k in ("key_column", "label_column", "patient_column", "age_column", "sex_column")
                if getattr(self, k)
            }
            clash = [f"'{c}' (labels.{taken[c]})" for c in self.group_columns if c in taken]
            if clash or len(set(self.group_columns)) != len(self.group_columns):
                raise ValueError(
                    f"labels.group_columns {self.group_columns} must be distinct columns other than the key, "
                    f"label, patient, age and sex columns (those are hashed, binned or parsed){': ' if clash else ''}"
                    + ", ".join(clash)
                )
        return self


class WindowConfig(StrictModel):
    center: float
    width: float = Field(gt=0)


class PreprocessConfig(StrictModel):
    spatial_dims: Literal[2, 3] = 2
    image_size: list[int] = Field(default_factory=lambda: [224, 224])  # (H, W) or (D, H, W)
    spacing: list[float] | None = None  # 3D only: target (z, y, x) spacing in mm before size crop/pad
    channels: Literal[1, 3] = 1
    # where the intensity window comes from: the DICOM header (VOI LUT / WindowCenter/Width, falling back
    # to min-max), the manifest's `window` for every DICOM file, or min-max of each image
    voi: Literal["header", "manifest", "minmax"] = "header"
    window: WindowConfig | None = None
    # after windowing every image lies in [0, 1]; zscore then standardizes each image on its own
    normalize: Literal["unit", "zscore"] = "unit"
    multiframe: Literal["split", "volume", "first"] = "split"
    # 3D series: slice gaps that deviate more than this fraction from the median are "uneven"
    gap_tolerance: float = Field(default=0.1, gt=0)
    uneven_series: Literal["interpolate", "reject"] = "interpolate"
    # images with fewer rows or columns than this are rejected as too_small (a 1x1 "image" shows nothing)
    min_size: int = Field(default=8, ge=1, le=4096)

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        n = self.spatial_dims
        if len(self.image_size) != n or any(s < 4 or s > 4096 for s in self.image_size):
            raise ValueError(
                f"preprocess.image_size must be {n} sizes between 4 and 4096, got {self.image_size}"
            )
        if self.spacing is not None and (n != 3 or len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(
                "preprocess.spacing is for spatial_dims=3 only: three positive mm values (z, y, x)"
            )
        if self.voi == "manifest" and self.window is None:
            raise ValueError("preprocess.voi=manifest needs preprocess.window: {center: ..., width: ...}")
        return self


class IngestConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    scans: ScansConfig
    labels: LabelsConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    # salted hashes: the salt lives outside the store and outside MLflow; generated on first use
    salt_file: Path = Path(".fewscan/salt")
    cache_dir: Path | None = Path(".fewscan/cache/ingest")  # null disables the decode cache
    workers: int = Field(default=0, ge=0)  # 0 = the CPUs this process may use (pipeline/cpus.py)
    # the local-only report (clear paths, next to the salt): never uploaded
    local_report_dir: Path = Path(".fewscan/reports")
    # where a finished store is kept when recording it in MLflow fails (never uploaded)
    kept_dir: Path = Path(".fewscan/kept")


def load_manifest(path: str | Path, overrides: list[str] | None = None) -> IngestConfig:
    return load_yaml(path, IngestConfig, overrides)
