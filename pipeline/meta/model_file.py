"""`meta_model.json` as a typed model (docs/CONTRACTS.md, "Artifacts between stages"): what a `models/<method>`
folder of a meta-train run says about its network, how it was trained, and the facts of the ingest it was
trained on that adapt needs. On the base of pipeline/artifacts.py (read_artifact, schema_version); kept in
the engine's package, beside the ModelSpec it holds, so that the episodes stage's code set does not reach
the engine (pipeline/codeset.py). No torch: pipeline/meta/model_io.py reads and writes it with the tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from pipeline.artifacts import Artifact
from pipeline.meta.specs import ModelSpec

META_FORMAT = "fewscan-meta-model"


class InnerRecord(BaseModel):
    """The inner loop the meta-model was trained with (`MetaModel.method` adapts with it)."""

    model_config = ConfigDict(extra="allow")

    steps: int
    lr: float
    eval_steps: int | None = None
    learned_lr: str | None = None
    trainable: str = "all"
    second_order: bool | None = None
    clip_grad: float | None = None


class IngestFacts(BaseModel):
    """What adapt needs of the ingest the meta-model was trained on, recorded by meta-train so that adapt
    reads it from the meta-model alone (no walk back to the episodes and ingest runs; docs/adapt.md)."""

    run_id: str = Field(description="the ingest run")
    preprocessing: dict[str, Any] = Field(description="store.json 'preprocessing': how every scan was read")
    modalities: list[str] = Field(description="DICOM modalities of the scan index, upper case; [] = unknown")
    normal_label: str | None = None
    label_names: list[str] = Field(default_factory=list)
    salt_id: str | None = Field(
        default=None, description="which salt keyed the patients (pipeline/ingest/deid.py)"
    )
    n_patients: int = 0
    patients_file: str | None = Field(
        default=None,
        description="file beside meta_model.json listing the salted patient keys of the ingest, one a line",
    )


class MetaModelFile(Artifact):
    """`meta_model.json` of a `models/<method>` folder (pipeline/meta/model_io.py). `format` and `version`
    are those older fewscan versions check (they read any version-1 file and ignore new fields), so they
    stay as they were; `schema_version` counts this model's changes: 2 added `ingest`."""

    FILE: ClassVar[str] = "meta_model.json"
    PRODUCER: ClassVar[str] = "meta-train"
    SCHEMA_VERSION: ClassVar[int] = 2
    VERSION: ClassVar[int] = 1

    format: str
    version: int = 1
    method: str
    model: ModelSpec
    in_channels: int
    image_shape: list[int]
    spatial_dims: int
    head: str
    normalization: str
    inner: InnerRecord
    # provenance, written by meta-train (a meta-model saved by other code may lack it)
    ingest_run_id: str | None = None
    episodes_run_id: str | None = None
    meta_train_run_id: str | None = None
    preprocessing: dict[str, Any] | None = None
    label_names: list[str] | None = None
    normal_label: str | None = None
    train_conditions: list[str] | None = None
    selected: str | None = None
    best_val_acc: float | None = None
    outer_steps: int | None = None
    seed: int | None = None
    meta_train_seed: int | None = None
    ingest: IngestFacts | None = Field(default=None, description="schema 2: the ingest facts adapt needs")
