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
    # npz: MedMNIST-style *_labels arrays inside the npz files, named by `names`
    source: Literal["csv", "folders", "npz"] = "csv"
    path: Path | None = None
    delimiter: Literal["auto", ",", "\t", ";"] = "auto"
    join: JoinKey = "file_name"
    key_column: str | None = None  # column holding the join value; required for csv
    label_column: str | None = None  # required for csv
    separator: str = "|"  # multi-label separator inside label_column
    patient_column: str | None = None  # hashed only, never stored in clear
    age_column: str | None = None  # kept as 5-year bins
    sex_column: str | None = None  # kept as M/F/O
    normal_label: str = "No Finding"
    names: list[str] | None = None  # npz: label index -> name
    npz_splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]

    @model_validator(mode="after")
    def _check(self) -> LabelsConfig:
        if self.source == "csv":
            missing = [k for k in ("path", "key_column", "label_column") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"labels.source=csv needs labels.{', labels.'.join(missing)}")
        if self.source == "npz" and not self.names:
            raise ValueError("labels.source=npz needs labels.names (label index -> condition name)")
        if not self.separator:
            raise ValueError("labels.separator must not be empty")
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
    workers: int = Field(default=0, ge=0)  # 0 = all cores
    # the local-only report (clear paths, next to the salt): never uploaded
    local_report_dir: Path = Path(".fewscan/reports")
    # where a finished store is kept when recording it in MLflow fails (never uploaded)
    kept_dir: Path = Path(".fewscan/kept")


def load_manifest(path: str | Path, overrides: list[str] | None = None) -> IngestConfig:
    return load_yaml(path, IngestConfig, overrides)
