"""meta_model.json through its model (pipeline/artifacts.py MetaModelFile): what meta-train records of its
ingest for adapt, compatibility with the files older fewscan versions wrote and read, and the errors of a
file this fewscan cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.adapt.stage import ingest_facts, scan_spec
from pipeline.artifacts import ArtifactError
from pipeline.errors import DataError, UpstreamError
from pipeline.meta.model_file import IngestFacts
from pipeline.meta.model_io import PATIENTS_FILE, load_meta_model, save_meta_model
from pipeline.meta.models import ModelSpec, build_model

SPEC = ModelSpec(backbone="conv4", filters=8, blocks=2, norm_groups=4)
FACTS = IngestFacts(
    run_id="ing1",
    preprocessing={"size": [16, 16], "channels": 1},
    modalities=["CR", "DX"],
    normal_label="No Finding",
    salt_id="s1",
    n_patients=2,
)


def _save(folder: Path, **kw: object) -> Path:
    torch.manual_seed(0)
    return save_meta_model(
        folder,
        build_model(SPEC, 1, (16, 16)),
        method="fomaml",
        model_spec=SPEC,
        image_shape=(1, 16, 16),
        inner={"steps": 2, "lr": 0.1, "eval_steps": 4, "trainable": "all"},
        extra={"ingest_run_id": "ing1", "preprocessing": FACTS.preprocessing, "seed": 3},
        **kw,  # type: ignore[arg-type]
    )


def test_meta_train_records_the_ingest_facts_and_patients_adapt_reads(tmp_path: Path) -> None:
    folder = _save(tmp_path / "m", ingest=FACTS, patient_keys=["bb", "aa", "bb"])
    raw = json.loads((folder / "meta_model.json").read_text())
    # format and version as older fewscan versions check them (they read it and ignore the new fields)
    assert raw["format"] == "fewscan-meta-model" and raw["version"] == 1 and raw["schema_version"] == 2
    assert (folder / PATIENTS_FILE).read_text() == "aa\nbb\n"
    mm = load_meta_model(folder)
    assert mm.meta.seed == 3 and mm.meta.inner.eval_steps == 4 and mm.method().steps == 4  # type: ignore[attr-defined]
    facts = ingest_facts(mm)
    assert facts.run_id == "ing1" and facts.salt_id == "s1" and facts.patients_file == PATIENTS_FILE
    spec = scan_spec(mm, facts)
    assert spec.modalities == frozenset({"CR", "DX"}) and spec.shape == (1, 16, 16)
    assert spec.preprocessing == {"size": [16, 16], "channels": 1}
    assert mm.training_patients() == {"aa", "bb"}
    assert FACTS.patients_file is None  # the caller's facts are not changed by the save


def test_an_old_meta_model_without_ingest_facts_loads_but_adapt_asks_to_rerun_meta_train(
    tmp_path: Path,
) -> None:
    folder = _save(tmp_path / "old")
    raw = json.loads((folder / "meta_model.json").read_text())
    del raw["schema_version"], raw["ingest"]  # as fewscan wrote it before schema 2
    (folder / "meta_model.json").write_text(json.dumps(raw))
    mm = load_meta_model(folder)  # evaluate still reads it
    assert mm.meta.schema_version == 1 and mm.meta.ingest is None and mm.training_patients() is None
    with pytest.raises(UpstreamError, match="records no ingest facts .* re-run meta-train with this fewscan"):
        ingest_facts(mm)


def test_no_modality_recorded_means_no_modality_check(tmp_path: Path) -> None:
    mm = load_meta_model(_save(tmp_path / "m", ingest=FACTS.model_copy(update={"modalities": []})))
    assert scan_spec(mm, ingest_facts(mm)).modalities is None


def test_a_meta_model_missing_a_field_or_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path / "m", ingest=FACTS)
    path = folder / "meta_model.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "image_shape"}))
    with pytest.raises(ArtifactError, match=r"'image_shape' is missing.*re-run the meta-train stage"):
        load_meta_model(folder)
    path.write_text(json.dumps({**good, "schema_version": 3}))
    with pytest.raises(ArtifactError, match="schema_version 3.*written by a newer fewscan"):
        load_meta_model(folder)
    path.write_text(json.dumps({**good, "version": 2}))
    with pytest.raises(DataError, match="has version 2; this fewscan reads up to 1"):
        load_meta_model(folder)
    path.write_text(json.dumps({**good, "format": "something-else"}))
    with pytest.raises(DataError, match="is not a fewscan meta-model"):
        load_meta_model(folder)
