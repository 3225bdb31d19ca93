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
    root: Path = Field(description="the folder of the study's scans (read recursively)")
    formats: list[Format] = Field(
        default=["dicom", "nifti", "png", "jpeg", "npz"], description="file formats to read"
    )  # pydantic copies mutable defaults
    # glob patterns (matched against the path relative to root) that are never read, e.g. "**/README*"
    exclude: list[str] = Field(
        default_factory=list, description='glob patterns never read, e.g. "**/README*"'
    )

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
    source: Literal["csv", "folders", "npz", "none"] = Field(
        default="csv",
        description="csv: a label table; folders: the first folder under scans.root names the condition; "
        "npz: MedMNIST-style label arrays named by `names`; none: no labels",
    )
    path: Path | None = Field(default=None, description="csv: the label table (CSV/TSV)")
    delimiter: Literal["auto", ",", "\t", ";"] = Field(
        default="auto", description="csv: the column delimiter"
    )
    join: JoinKey = Field(default="file_name", description="csv: what key_column holds, to match a scan")
    key_column: str | None = Field(default=None, description="csv: the column of the join value (required)")
    label_column: str | None = Field(default=None, description="csv: the labels column (except one_hot)")
    separator: str = Field(default="|", description="multi-label separator inside label_column")
    # csv: how a row names its conditions (docs/ingest.md, "Label layouts"): `separated` text in
    # label_column, a JSON/Python `list` string in label_column, or `one_hot` columns (label_columns)
    format: Literal["separated", "list", "one_hot"] = Field(
        default="separated",
        description="csv: how a row names its conditions (docs/ingest.md, 'Label layouts')",
    )
    label_columns: list[str] | None = Field(
        default=None, description="one_hot: one column per condition, named as the condition"
    )
    # one_hot: what -1 (uncertain) and a blank cell mean; no default, the choice changes the labels
    uncertain: Literal["positive", "negative", "exclude"] | None = Field(
        default=None, description="one_hot: what -1 (uncertain) means"
    )
    blank: Literal["negative", "exclude"] | None = Field(
        default=None, description="one_hot: what a blank cell means"
    )
    patient_column: str | None = Field(
        default=None, description="csv: patient id column (hashed, never kept)"
    )
    age_column: str | None = Field(default=None, description="csv: age column (kept as 5-year bins)")
    sex_column: str | None = Field(default=None, description="csv: sex column (kept as M/F/O)")
    normal_label: str = Field(default="No Finding", description="the label of a scan without findings")
    names: list[str] | None = Field(default=None, description="npz: label index -> name")
    # csv only: columns copied verbatim into the scan index, to group episodes by (episodes.group_by):
    # e.g. body part, or an alphabet. Kept in clear, so never a patient attribute (docs/ingest.md).
    group_columns: list[str] = Field(
        default_factory=list,
        description="csv: columns copied in clear into the scan index (episodes.group_by)",
    )
    npz_splits: list[Literal["train", "val", "test"]] = Field(
        default=["train", "val", "test"], description="npz: which splits of the files to read"
    )

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
    center: float = Field(description="window center")
    width: float = Field(gt=0, description="window width")


class PreprocessConfig(StrictModel):
    spatial_dims: Literal[2, 3] = Field(default=2, description="2: images; 3: volumes")
    image_size: list[int] = Field(default_factory=lambda: [224, 224], description="(H, W) or (D, H, W)")
    spacing: list[float] | None = Field(
        default=None, description="3D only: target (z, y, x) spacing in mm before the size crop/pad"
    )
    channels: Literal[1, 3] = Field(default=1, description="channels of the stored images")
    # where the intensity window comes from: the DICOM header (VOI LUT / WindowCenter/Width, falling back
    # to min-max), the manifest's `window` for every DICOM file, or min-max of each image
    voi: Literal["header", "manifest", "minmax"] = Field(
        default="header",
        description="where the intensity window comes from (DICOM header, `window`, min-max)",
    )
    window: WindowConfig | None = Field(default=None, description="the window of voi: manifest")
    # after windowing every image lies in [0, 1]; zscore then standardizes each image on its own
    normalize: Literal["unit", "zscore"] = Field(
        default="unit", description="unit: windowed to [0, 1]; zscore: then standardized per image"
    )
    multiframe: Literal["split", "volume", "first"] = Field(
        default="split", description="a multi-frame DICOM: one image per frame, a volume, or its first frame"
    )
    # 3D series: slice gaps that deviate more than this fraction from the median are "uneven"
    gap_tolerance: float = Field(
        default=0.1, gt=0, description="3D series: a slice gap off the median by more is uneven"
    )
    uneven_series: Literal["interpolate", "reject"] = Field(
        default="interpolate", description="3D series with uneven gaps: resample or reject"
    )
    # images with fewer rows or columns than this are rejected as too_small (a 1x1 "image" shows nothing)
    min_size: int = Field(
        default=8, ge=1, le=4096, description="fewer rows or columns: rejected as too_small"
    )

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
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the dataset's name (tags its runs)")
    scans: ScansConfig = Field(description="which files")
    labels: LabelsConfig = Field(description="where the labels come from")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig, description="how every scan is read into the store"
    )
    # salted hashes: the salt lives outside the store and outside MLflow; generated on first use
    salt_file: Path = Field(
        default=Path(".fewscan/salt"), description="the salt of the keys (never uploaded)"
    )
    cache_dir: Path | None = Field(
        default=Path(".fewscan/cache/ingest"), description="decode cache; null disables it"
    )
    workers: int = Field(default=0, ge=0, description="decoding processes; 0: the CPUs this process may use")
    # the local-only report (clear paths, next to the salt): never uploaded
    local_report_dir: Path = Field(
        default=Path(".fewscan/reports"), description="local report with clear paths (never uploaded)"
    )
    # where a finished store is kept when recording it in MLflow fails (never uploaded)
    kept_dir: Path = Field(
        default=Path(".fewscan/kept"), description="where a store is kept when recording it in MLflow fails"
    )


def load_manifest(path: str | Path, overrides: list[str] | None = None) -> IngestConfig:
    return load_yaml(path, IngestConfig, overrides)
