"""The JSON files one stage hands to the next, as typed models: `split.json` (episodes) and `results.json`
(evaluate) here, `meta_model.json` (meta-train) in pipeline/meta/model_file.py on the same base (it needs
the engine's ModelSpec, and episodes' code set must not reach the engine: pipeline/codeset.py). The writer
builds the model and writes its JSON; the reader
parses the file with the same model (`read_artifact`), so a missing or renamed field fails where the file
is read, naming the file, the field and the stage to re-run, instead of as a KeyError deep in a stage
(docs/CONTRACTS.md, "Artifacts between stages").

Versions. Every file carries `schema_version`. A reader refuses a file with a newer schema version than it
knows (written by a newer fewscan) with an error saying so. A file written before `schema_version`
existed reads as version 1: its fields are the ones version 1 describes.

No torch, no mlflow: the CLI, the docs generator and the tests import this module alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import atomic
from pipeline.errors import UpstreamError


class ArtifactError(UpstreamError):
    """An artifact file of an upstream run cannot be read with this fewscan's model of it."""


class Artifact(BaseModel):
    """Base of the artifact models. Unknown fields are kept (a writer may add provenance a reader does not
    use); NaN and infinities are written as JSON's NaN/Infinity, as `json.dumps` writes them, so that a
    metric that is NaN reads back as NaN, not None."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")

    FILE: ClassVar[str]  # the file name, for messages
    PRODUCER: ClassVar[str]  # the stage that writes it: the one to re-run
    SCHEMA_VERSION: ClassVar[int]  # the newest schema this fewscan writes and reads

    schema_version: int = Field(default=1, description="version of this file's schema; absent = 1")


A = TypeVar("A", bound=Artifact)


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_artifact(model: type[A], text: str | bytes, source: str) -> A:
    """`text` (the JSON of a `model.FILE`) as `model`; `source` names the file in the messages."""
    try:
        parsed = model.model_validate_json(text)
    except ValidationError as err:
        _refuse_newer(model, _peek_version(text), source)
        problems = "; ".join(
            f"'{_location(e['loc'])}' {'is missing' if e['type'] == 'missing' else e['msg'].lower()}"
            for e in err.errors()[:5]
        )
        more = f" (and {err.error_count() - 5} more)" if err.error_count() > 5 else ""
        raise ArtifactError(
            f"{source} is not a {model.FILE} this fewscan can read: {problems}{more}. It was written by another "
            f"fewscan version or changed by hand; re-run the {model.PRODUCER} stage with this fewscan"
        ) from None
    _refuse_newer(model, parsed.schema_version, source)
    return parsed


def _peek_version(text: str | bytes) -> int | None:
    try:
        raw = json.loads(text)
    except ValueError:
        return None
    v = raw.get("schema_version") if isinstance(raw, dict) else None
    return v if isinstance(v, int) else None


def _refuse_newer(model: type[Artifact], version: int | None, source: str) -> None:
    if version is not None and version > model.SCHEMA_VERSION:
        raise ArtifactError(
            f"{source} has schema_version {version}, but this fewscan reads {model.FILE} only up to version "
            f"{model.SCHEMA_VERSION}: it was written by a newer fewscan. Upgrade fewscan (or re-run the "
            f"{model.PRODUCER} stage with this one)"
        )


def read_artifact(model: type[A], path: str | Path) -> A:
    """Read and validate `path` as `model` (ArtifactError naming the file, the field and the fix)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing; re-run the {model.PRODUCER} stage") from None
    return parse_artifact(model, text, str(path))


def write_artifact(path: str | Path, obj: Artifact, *, indent: int | None = None) -> None:
    """Write `obj` as JSON to `path` atomically (pipeline/atomic.py); optional fields left unset are
    written as they were given (None as null), so what the reader parses is what the writer built."""
    atomic.write_text(path, obj.model_dump_json(indent=indent) + "\n")


# ------------------------------------------------------------------------------------------ split.json
class ConditionInfo(BaseModel):
    """One condition of the scan index and where the split put it (pipeline/episodes/split.py)."""

    model_config = ConfigDict(extra="allow")

    split: Literal["train", "val", "test", "dropped"]
    images: int = Field(description="scans of the whole index that carry it")
    patients: int = Field(description="patients of the whole index with such a scan")
    pool: Literal["train", "val", "test"] | None = Field(
        default=None, description="the pool its patients went to (kept when the condition is dropped)"
    )
    pool_images: int | None = None
    pool_patients: int | None = None
    eligible_patients: int | None = None
    exclusive_patients: int | None = None
    group_eligible_patients: dict[str, int] | None = None
    reason: str | None = Field(default=None, description="why it was dropped")


class PoolCount(BaseModel):
    images: int
    patients: int


class SplitFile(Artifact):
    """`split.json` of an episodes run: the condition split, the patient-disjoint pools (scan keys per
    class) and the episode shapes meta-train samples its training episodes with."""

    FILE: ClassVar[str] = "split.json"
    PRODUCER: ClassVar[str] = "episodes"
    SCHEMA_VERSION: ClassVar[int] = 1

    normal_label: str
    conditions: dict[str, ConditionInfo]
    normal: dict[str, PoolCount] = Field(description="normal scans and patients per pool")
    pools: dict[str, dict[str, list[str]]] = Field(
        description="pool -> class (condition, or the normal label) -> scan keys, sorted"
    )
    pool_patients: dict[str, int]
    pool_images: dict[str, int]
    pool_rule: str
    kinds: list[Literal["binary", "n_way"]]
    k_shots: list[int]
    q_query: int
    n_way: int
    multilabel: Literal["exclusive_in_episode", "single_finding"]
    patients_needed_per_class: int
    seed: int
    group_by: str | None = None
    groups: dict[str, dict[str, list[str]]] | None = Field(
        default=None, description="with group_by: pool -> group value -> conditions usable inside it"
    )
    group_normal_patients: dict[str, dict[str, int]] | None = None

    def pool_keys(self, pool: str) -> set[str]:
        """Every scan key of one pool (empty when the split has no such pool)."""
        return {k for keys in self.pools.get(pool, {}).values() for k in keys}

    def conditions_in(self, split: str) -> list[str]:
        return sorted(c for c, i in self.conditions.items() if i.split == split)


# ------------------------------------------------------------------------------------------ results.json
class MethodInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    family: str
    description: str
    seed_independent: bool


class ResultsSetup(BaseModel):
    """What was evaluated: provenance, seeds, conditions, episode counts per group (`<kind>.k<k>`)."""

    model_config = ConfigDict(extra="allow")

    seeds: list[int]
    meta_train_run: str | None = None
    episodes_run: str | None = None
    ingest_run: str | None = None
    meta_train_seeds: dict[str, list[int]] = Field(default_factory=dict)
    normal_label: str | None = None
    test_conditions: list[str] = Field(default_factory=list)
    val_conditions: list[str] = Field(default_factory=list)
    train_conditions: list[str] = Field(default_factory=list)
    n_test_episodes: dict[str, int]
    n_way: dict[str, int] = Field(default_factory=dict)
    queries: dict[str, dict[str, int]] = Field(default_factory=dict)
    n_val_episodes: dict[str, int] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)


class ResultsFile(Artifact):
    """`results.json` of an evaluate run (pipeline/evaluate/evaluation.py `assemble`). Typed at the top
    level and in `setup`/`methods`; the per-method, per-group tables keep the nested shape evaluation.py
    documents (docs/evaluation.md), read by report.py and plots.py."""

    FILE: ClassVar[str] = "results.json"
    PRODUCER: ClassVar[str] = "evaluate"
    SCHEMA_VERSION: ClassVar[int] = 1

    setup: ResultsSetup
    methods: dict[str, MethodInfo]
    selection: dict[str, dict[str, dict[str, Any]]] = Field(description="method -> seed -> group -> choice")
    results: dict[str, dict[str, Any]] = Field(description="method -> group -> per_seed / across_seeds")
    comparisons: dict[str, dict[str, Any]] = Field(description="group -> ranking, winner, intervals")
    curves: dict[str, Any] = Field(default_factory=dict)
    pretrain: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    definitions: dict[str, Any] = Field(default_factory=dict)
    timing_s: dict[str, float] = Field(default_factory=dict)
    plots: list[str] = Field(default_factory=list, description="the figures written beside it")

    @classmethod
    def of(cls, results: ResultsFile | Mapping[str, Any]) -> ResultsFile:
        """`results` as the model: the dict `evaluation.run` returns (numpy scalars become plain numbers,
        as json's `default=float` makes them; NaN stays NaN) or the model itself."""
        if isinstance(results, ResultsFile):
            return results
        return cls.model_validate_json(json.dumps(results, default=float))
