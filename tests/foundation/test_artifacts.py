"""The typed artifacts between stages (pipeline/artifacts.py): each model round-trips through its file, a
reader refuses a file missing a field or from a newer schema with an error naming the file, the field and
the stage to re-run, and a file written before schema_version existed reads as version 1."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.artifacts import ArtifactError, ResultsFile, SplitFile, read_artifact, write_artifact
from pipeline.errors import UpstreamError
from pipeline.meta.model_file import IngestFacts, MetaModelFile


def split_dict() -> dict[str, Any]:
    """A split.json as the episodes stage writes it (pipeline/episodes/split.py `build_split`)."""
    return {
        "normal_label": "No Finding",
        "conditions": {
            "Effusion": {
                "split": "train",
                "images": 40,
                "patients": 30,
                "pool": "train",
                "pool_images": 35,
                "pool_patients": 28,
                "eligible_patients": 25,
                "exclusive_patients": 20,
            },
            "Hernia": {"split": "test", "images": 12, "patients": 9, "pool": "test"},
            "Mass": {
                "split": "dropped",
                "images": 0,
                "patients": 0,
                "reason": "no scan in the index carries it",
            },
        },
        "normal": {p: {"images": 10, "patients": 8} for p in ("train", "val", "test")},
        "pools": {
            "train": {"Effusion": ["00aa", "00ab"], "No Finding": ["00ac"]},
            "val": {"No Finding": ["00ad"]},
            "test": {"Hernia": ["00ae"], "No Finding": ["00af"]},
        },
        "pool_patients": {"train": 3, "val": 1, "test": 2},
        "pool_images": {"train": 3, "val": 1, "test": 2},
        "pool_rule": "rare -> test",
        "kinds": ["binary", "n_way"],
        "k_shots": [1, 5],
        "q_query": 5,
        "n_way": 3,
        "multilabel": "exclusive_in_episode",
        "patients_needed_per_class": 10,
        "seed": 0,
    }


def meta_dict() -> dict[str, Any]:
    return {
        "format": "fewscan-meta-model",
        "version": 1,
        "schema_version": 2,
        "method": "maml",
        "model": {"backbone": "conv4", "filters": 8},
        "in_channels": 1,
        "image_shape": [1, 16, 16],
        "spatial_dims": 2,
        "head": "proto",
        "normalization": "group",
        "inner": {"steps": 3, "eval_steps": 5, "lr": 0.1, "learned_lr": "none", "trainable": "all"},
        "ingest_run_id": "r1",
        "best_val_acc": 0.7,
        "ingest": {
            "run_id": "r1",
            "preprocessing": {"size": [16, 16], "channels": 1},
            "modalities": ["DX"],
            "salt_id": "abc",
            "n_patients": 3,
        },
        "a_future_provenance_key": [1, 2],  # unknown fields are kept
    }


def results_dict() -> dict[str, Any]:
    return {
        "setup": {"seeds": [0, 1], "n_test_episodes": {"binary.k1": 10}, "n_way": {"binary.k1": 2}},
        "methods": {"maml": {"family": "meta-learned", "description": "MAML", "seed_independent": False}},
        "selection": {"maml": {"0": {"binary.k1": {"chosen": {"steps": 3}}}}},
        "results": {"maml": {"binary.k1": {"across_seeds": {"std": None}, "per_seed": {}}}},
        "comparisons": {
            "binary.k1": {"winner": "maml", "acc": {"maml": {"mean": 0.7, "ci95": float("nan")}}}
        },
        "warnings": [],
        "timing_s": {"maml": 1.5},
    }


@pytest.mark.parametrize(
    ("model", "content"),
    [(SplitFile, split_dict), (MetaModelFile, meta_dict), (ResultsFile, results_dict)],
    ids=["split", "meta_model", "results"],
)
def test_each_artifact_round_trips_through_its_file(tmp_path: Path, model: Any, content: Any) -> None:
    typed = model.model_validate(content())
    path = tmp_path / model.FILE
    write_artifact(path, typed, indent=1)
    back = read_artifact(model, path)
    # compared as JSON: results hold a NaN, which is not equal to itself
    assert back.model_dump_json() == typed.model_dump_json() and type(back) is model
    assert json.loads(path.read_text())["schema_version"] == model.SCHEMA_VERSION


def test_typed_fields_read_as_attributes_and_nan_survives(tmp_path: Path) -> None:
    write_artifact(tmp_path / "split.json", SplitFile.model_validate(split_dict()))
    split = read_artifact(SplitFile, tmp_path / "split.json")
    assert split.conditions["Effusion"].eligible_patients == 25 and split.conditions["Mass"].pool is None
    assert split.pool_keys("test") == {"00ae", "00af"} and split.conditions_in("train") == ["Effusion"]
    meta = MetaModelFile.model_validate(meta_dict())
    assert meta.ingest is not None and meta.ingest.modalities == ["DX"] and meta.model.filters == 8
    assert meta.model_extra == {"a_future_provenance_key": [1, 2]}
    write_artifact(tmp_path / "results.json", ResultsFile.model_validate(results_dict()))
    res = read_artifact(ResultsFile, tmp_path / "results.json")
    # NaN is written as JSON's NaN (as json.dumps does), not turned into null
    assert math.isnan(res.comparisons["binary.k1"]["acc"]["maml"]["ci95"])
    assert res.setup.seeds == [0, 1] and res.methods["maml"].family == "meta-learned"


@pytest.mark.parametrize(
    ("model", "content", "drop", "stage"),
    [
        (SplitFile, split_dict, "pools", "episodes"),
        (SplitFile, split_dict, "k_shots", "episodes"),
        (MetaModelFile, meta_dict, "inner", "meta-train"),
        (ResultsFile, results_dict, "comparisons", "evaluate"),
    ],
)
def test_a_missing_field_fails_at_read_naming_file_field_and_stage(
    tmp_path: Path, model: Any, content: Any, drop: str, stage: str
) -> None:
    raw = content()
    del raw[drop]
    path = tmp_path / model.FILE
    path.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError) as err:
        read_artifact(model, path)
    msg = str(err.value)
    assert str(path) in msg and f"'{drop}' is missing" in msg and f"re-run the {stage} stage" in msg
    assert isinstance(err.value, UpstreamError)  # the CLI prints it as one line, exit 2


def test_a_renamed_nested_field_is_named_with_its_path(tmp_path: Path) -> None:
    raw = split_dict()
    raw["conditions"]["Hernia"]["pool_split"] = raw["conditions"]["Hernia"].pop("split")
    (tmp_path / "split.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=r"'conditions\.Hernia\.split' is missing"):
        read_artifact(SplitFile, tmp_path / "split.json")


@pytest.mark.parametrize("model,content", [(SplitFile, split_dict), (ResultsFile, results_dict)])
def test_a_newer_schema_version_is_refused_as_such(tmp_path: Path, model: Any, content: Any) -> None:
    for raw in (content(), {"schema_version": 99}):  # whether or not the rest still validates
        raw["schema_version"] = model.SCHEMA_VERSION + 1
        (tmp_path / model.FILE).write_text(json.dumps(raw))
        with pytest.raises(ArtifactError) as err:
            read_artifact(model, tmp_path / model.FILE)
        msg = str(err.value)
        assert f"schema_version {model.SCHEMA_VERSION + 1}" in msg and "written by a newer fewscan" in msg
        assert f"up to version {model.SCHEMA_VERSION}" in msg


def test_a_file_from_before_schema_version_reads_as_version_1(tmp_path: Path) -> None:
    raw = split_dict()
    (tmp_path / "split.json").write_text(json.dumps(raw))  # no schema_version key, as before
    assert read_artifact(SplitFile, tmp_path / "split.json").schema_version == 1
    old = meta_dict()
    del old["schema_version"], old["ingest"]  # a meta-model of schema 1: no ingest facts
    assert MetaModelFile.model_validate(old).schema_version == 1
    assert MetaModelFile.model_validate(old).ingest is None


def test_a_missing_or_unparsable_file_says_which_stage_to_rerun(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"split\.json is missing; re-run the episodes stage"):
        read_artifact(SplitFile, tmp_path / "split.json")
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="re-run the evaluate stage"):
        read_artifact(ResultsFile, tmp_path / "results.json")


def test_ingest_facts_need_their_core_fields() -> None:
    with pytest.raises(ValueError, match="preprocessing"):
        IngestFacts.model_validate({"run_id": "r1", "modalities": []})


def test_the_artifact_models_import_neither_torch_nor_mlflow(tmp_path: Path) -> None:
    code = (
        "import sys, pipeline.artifacts, pipeline.meta.model_file\n"
        "print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
