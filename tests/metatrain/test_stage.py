"""The meta-train stage: contract outputs (models/<method> loadable by load_meta_model, provenance in
meta_model.json, checkpoints, curves), metrics per step, registration of the primary method, config
validation and command-line overrides."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from pipeline import distributed
from pipeline.artifacts import ArtifactError
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.meta.model_io import load_meta_model
from pipeline.metatrain import stage
from pipeline.metatrain.config import MetaTrainConfig
from pipeline.protocols import NullRun, RunLike

from .world import build_world


class FakeRun(NullRun):
    """A run recording what the stage gave it (artifacts copied, as uploaded), the rest as a NullRun."""

    def __init__(self, root: Path):
        super().__init__(root / "out", run_id="mt0")
        self.outdir.mkdir(parents=True)
        self.uploaded = root / "uploaded"
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.registered: list[tuple[str, str, str]] = []

    def log_params(self, d: dict[str, Any]) -> None:
        self.params.update(d)

    def log_metrics(self, d: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(d), step))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        import shutil

        p = Path(local_path)
        dest = self.uploaded / (artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        if p.is_dir():
            shutil.copytree(p, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(p, dest / p.name)

    def own_artifact(self, rel: str) -> Path | None:
        p = self.uploaded / rel
        return p if p.exists() else None

    def register_model(self, artifact_path: str, name: str, alias: str = "current") -> str:
        self.registered.append((artifact_path, name, alias))
        return "1"


# mypy checks the fake against what the stages may call (pipeline/protocols.py)
_IS_A_RUN: type[RunLike] = FakeRun


class FakeUpstream:
    def __init__(
        self, run_id: str, root: Path, tags: dict[str, str], up: dict[str, FakeUpstream] | None = None
    ):
        self.run_id, self.root, self.tags, self._up = run_id, root, tags, up or {}

    def artifact(self, rel: str) -> Path:
        return self.root / rel

    def read_json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())

    def upstream(self, stage_name: str) -> FakeUpstream:
        return self._up[stage_name]


def _cfg(**over: Any) -> MetaTrainConfig:
    base: dict[str, Any] = {
        "methods": ["maml", "protonet"],
        "model": {"filters": 8, "blocks": 2},
        "inner": {"steps": 1, "lr": 0.1, "eval_steps": 2},
        "outer": {"steps": 4, "lr": 3e-3, "warmup_steps": 0},
        "meta_batch": 2,
        "val_every": 2,
        "checkpoint_every": 2,
        "threads": 1,
        "seeds": [0],
    }
    base.update(over)
    return validate(base, MetaTrainConfig, "test")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_world(tmp_path_factory.mktemp("world"))


def _upstream(world: dict[str, Path]) -> dict[str, Any]:
    ingest = FakeUpstream("ingest0", world["store"].parent, {})
    eps = FakeUpstream("episodes0", world["episodes"], {"fewscan.suite": "tiny"}, {"ingest": ingest})
    return {"episodes": eps}


def test_execute_writes_loadable_models_checkpoints_curves_and_registers_the_primary(world, tmp_path):
    run = FakeRun(tmp_path)
    res = stage.execute(_cfg(), run, _upstream(world))  # type: ignore[arg-type]

    for method in ("maml", "protonet"):
        folder = run.uploaded / "models" / method
        mm = load_meta_model(folder)
        assert mm.meta.method == method
        assert mm.meta.ingest_run_id == "ingest0" and mm.meta.episodes_run_id == "episodes0"
        assert mm.meta.preprocessing == {"size": [16, 16], "channels": 1}
        assert mm.meta.image_shape == [1, 16, 16] and mm.meta.normalization == "group"
        assert mm.meta.inner.eval_steps == 2
        # the ingest facts adapt reads from the meta-model alone (schema 2), and the ingest's patients
        assert mm.meta.schema_version == 2 and mm.meta.ingest is not None
        assert mm.meta.ingest.run_id == "ingest0"
        assert mm.meta.ingest.preprocessing == {"size": [16, 16], "channels": 1}
        index = pd.read_parquet(world["store"] / "scan_index.parquet")
        assert mm.training_patients() == set(index["patient_key"].astype(str))
        assert mm.meta.ingest.modalities == []  # the world's index has no modality column: not checked
        assert mm.meta.ingest.n_patients == len(mm.training_patients() or ())
        assert (run.uploaded / "checkpoints" / method / "last.pt").is_file()
        assert (run.uploaded / "checkpoints" / method / "best.pt").is_file()
        # the saved weights are the best-by-validation checkpoint's
        best = torch.load(run.uploaded / "checkpoints" / method / "best.pt", weights_only=True)
        saved = mm.model.state_dict()
        for k, v in saved.items():
            assert torch.equal(v, best["learner"]["model." + k]), k
        assert (mm.meta.selected or "").startswith("best")
        x = torch.randn(4, 1, 16, 16)
        method_obj = mm.method()
        proba = method_obj.predict_proba(method_obj.fit(x, torch.tensor([0, 1, 0, 1]), 2), x)
        assert torch.allclose(proba.sum(1), torch.ones(4), atol=1e-5)

    assert run.registered == [("models/maml", "fewscan-tiny-meta", "latest")]
    curves = json.loads((run.outdir / "curves.json").read_text())
    assert [r["step"] for r in curves["maml"]] == [1, 2, 3, 4]
    assert "val_acc" in curves["maml"][1] and "val_acc" not in curves["maml"][0]
    steps = [s for d, s in run.metrics if "maml.train_loss" in d]
    assert steps == [1, 2, 3, 4]
    assert all(0.0 <= d["maml.val_acc"] <= 1.0 for d, _ in run.metrics if "maml.val_acc" in d)
    assert run.params["derived"]["train_conditions"] == ["Alpha", "Beta", "Gamma"]
    assert "maml.best_val_acc" in res.metrics and "registered fewscan-tiny-meta" in res.summary


def test_every_method_is_trained_once_per_seed_and_the_first_seed_is_registered(world, tmp_path):
    run = FakeRun(tmp_path)
    res = stage.execute(_cfg(seeds=[0, 5], methods=["protonet"]), run, _upstream(world))  # type: ignore[arg-type]
    first = load_meta_model(run.uploaded / "models" / "protonet")
    other = load_meta_model(run.uploaded / "seeds" / "protonet" / "5")
    assert first.meta.meta_train_seed == 0 and other.meta.meta_train_seed == 5
    # both record the ingest facts; only the model adapt uses (models/<method>) carries the patient list
    assert first.meta.ingest is not None and other.meta.ingest is not None
    assert first.training_patients() and other.training_patients() is None
    assert first.meta.seed != other.meta.seed
    w = "backbone.features.0.weight"
    assert not torch.equal(first.model.state_dict()[w], other.model.state_dict()[w])  # another run
    assert (run.uploaded / "checkpoints" / "protonet" / "seed-5" / "last.pt").is_file()
    curves = json.loads((run.outdir / "curves.json").read_text())
    assert set(curves) == {"protonet", "protonet.seed5"}
    assert any("protonet.seed5.train_loss" in d for d, _ in run.metrics)
    assert run.registered == [("models/protonet", "fewscan-tiny-meta", "latest")]
    assert "x 2 seed(s)" in res.summary and "protonet.best_val_acc_seed_mean" in res.metrics
    # the first seed's model is the one a single-seed run with that seed trains: same weights
    run1 = FakeRun(tmp_path / "single")
    stage.execute(_cfg(seeds=[0], methods=["protonet"]), run1, _upstream(world))  # type: ignore[arg-type]
    single = load_meta_model(run1.uploaded / "models" / "protonet")
    assert torch.equal(single.model.state_dict()[w], first.model.state_dict()[w])


def test_meta_train_leaves_no_scratch_folder_behind_finished_or_failed(world, tmp_path, monkeypatch):
    # a private temporary root: other processes' files in the system one cannot blur what this run left
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    run = FakeRun(tmp_path / "ok")
    stage.execute(_cfg(methods=["protonet"]), run, _upstream(world))  # type: ignore[arg-type]
    assert (run.uploaded / "checkpoints" / "protonet" / "last.pt").is_file()  # it did use its scratch
    assert list(tmp_root.iterdir()) == []

    class Refused(FakeRun):
        def register_model(self, artifact_path: str, name: str, alias: str = "current") -> str:
            raise RuntimeError("registry down")

    with pytest.raises(RuntimeError, match="registry down"):
        stage.execute(_cfg(methods=["protonet"]), Refused(tmp_path / "bad"), _upstream(world))  # type: ignore[arg-type]
    assert list(tmp_root.iterdir()) == []
    # a non-main torchrun rank's private output folder goes too
    with distributed.FollowerRun("meta-train", 1) as follower:
        assert follower.outdir.parent == tmp_root and follower.outdir.is_dir()
        (follower.outdir / "curves.json").write_text("{}")
    assert list(tmp_root.iterdir()) == []


def test_the_older_single_seed_key_still_works_and_seeds_must_be_distinct():
    assert validate({"seed": 3}, MetaTrainConfig, "test").seeds == [3]
    assert validate({}, MetaTrainConfig, "test").seeds == [0, 1, 2]
    with pytest.raises(ConfigError, match="not both"):
        validate({"seed": 3, "seeds": [1]}, MetaTrainConfig, "test")
    with pytest.raises(ConfigError, match="distinct"):
        validate({"seeds": [1, 1]}, MetaTrainConfig, "test")
    args = argparse.Namespace(mt_seeds="4, 7")
    assert "seeds=[4, 7]" in stage.overrides_from_args(args)
    with pytest.raises(ConfigError, match="--seeds"):
        stage.overrides_from_args(argparse.Namespace(mt_seeds="a,b"))


def test_resume_skips_a_finished_method_and_continues_from_last(world, tmp_path):
    run = FakeRun(tmp_path)
    stage.execute(_cfg(methods=["fomaml"]), run, _upstream(world))  # type: ignore[arg-type]
    first = load_meta_model(run.uploaded / "models" / "fomaml").model.state_dict()
    run.resumed = True
    run.metrics.clear()
    stage.execute(_cfg(methods=["fomaml"]), run, _upstream(world))  # type: ignore[arg-type]
    assert not [s for d, s in run.metrics if "fomaml.train_loss" in d]  # nothing retrained
    again = load_meta_model(run.uploaded / "models" / "fomaml").model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_config_rejects_unknown_methods_and_keys():
    with pytest.raises(ConfigError, match="unknown method"):
        _cfg(methods=["maml", "reptile"])
    with pytest.raises(ConfigError, match="unknown key 'meta_batchh'"):
        validate({"meta_batchh": 2}, MetaTrainConfig, "suite")
    with pytest.raises(ConfigError, match="inner.checkpoint only applies to second order"):
        _cfg(inner={"checkpoint": True})


def test_command_line_options_map_onto_the_section():
    p = argparse.ArgumentParser()
    stage.add_arguments(p)
    args = p.parse_args(["--methods", "maml, anil", "--steps", "50", "--second-order", "--device", "cpu"])
    over = stage.overrides_from_args(args)
    assert over == ["methods=[maml,anil]", "outer.steps=50", "device=cpu", "inner.second_order=true"]
    from pipeline.config import apply_overrides

    cfg = validate(apply_overrides({}, over), MetaTrainConfig, "cli")
    assert cfg.methods == ["maml", "anil"] and cfg.outer.steps == 50 and cfg.inner.second_order
    assert "maml+anil" in stage.run_name(cfg)


def test_a_planted_checkpoint_is_refused_and_its_payload_never_runs(world, tmp_path):
    from pipeline.errors import DataError
    from pipeline.meta.trainer import load_checkpoint

    from .planted import plant_checkpoint

    marker = tmp_path / "payload-ran"
    # control: the file really is a payload (unpickled in full, it runs)
    control = plant_checkpoint(tmp_path / "control.pt", marker)
    torch.load(control, weights_only=False)
    assert marker.read_text() == "payload ran"
    marker.unlink()

    run = FakeRun(tmp_path / "run")
    plant_checkpoint(run.uploaded / "checkpoints" / "maml" / "last.pt", marker)
    run.resumed = True
    with pytest.raises(DataError, match=r"holds more than weights.*refuses this file") as err:
        stage.execute(_cfg(methods=["maml"]), run, _upstream(world))  # type: ignore[arg-type]
    assert "last.pt" in str(err.value) and "exec" in str(err.value)  # names the file and what was refused
    assert "weights_only=False" not in str(err.value)  # never advises the unsafe load
    assert not marker.exists()
    assert not [d for d, _ in run.metrics if "maml.train_loss" in d]  # refused before any training
    with pytest.raises(DataError, match="holds more than weights"):
        load_checkpoint(control)
    assert not marker.exists()


def test_checkpoints_load_with_the_safe_unpickler(world, tmp_path):
    """Everything a checkpoint holds (optimizer and scheduler state, numpy's PCG64 state, torch generator
    states, curves) passes weights_only=True, and the trainer restores it."""
    from pipeline.meta.trainer import load_checkpoint

    run = FakeRun(tmp_path)
    stage.execute(_cfg(methods=["maml"]), run, _upstream(world))  # type: ignore[arg-type]
    ck = torch.load(run.uploaded / "checkpoints" / "maml" / "last.pt", weights_only=True)
    assert ck["step"] == 4 and ck["rng"]["numpy"]["bit_generator"] == "PCG64"
    assert load_checkpoint(run.uploaded / "checkpoints" / "maml" / "last.pt")["step"] == 4


def test_a_split_json_missing_a_field_fails_before_training_naming_file_field_and_fix(world, tmp_path):
    """split.json is read through its model (pipeline/artifacts.py): an episodes run written by another
    fewscan version, here without `k_shots`, fails at read, before any training, with the file, the field
    and the stage to re-run; a newer schema is refused as such."""
    eps = tmp_path / "episodes"
    shutil.copytree(world["episodes"], eps)
    split = json.loads((eps / "split.json").read_text())
    del split["k_shots"]
    (eps / "split.json").write_text(json.dumps(split))
    ingest = FakeUpstream("ingest0", world["store"].parent, {})
    up = {"episodes": FakeUpstream("episodes0", eps, {"fewscan.suite": "tiny"}, {"ingest": ingest})}
    run = FakeRun(tmp_path / "run")
    with pytest.raises(ArtifactError, match=r"split\.json .*'k_shots' is missing.*re-run the episodes stage"):
        stage.execute(_cfg(methods=["protonet"]), run, up)  # type: ignore[arg-type]
    assert run.metrics == [] and not (run.uploaded / "models").exists()
    (eps / "split.json").write_text(json.dumps({**split, "k_shots": [1], "schema_version": 2}))
    with pytest.raises(ArtifactError, match="schema_version 2.*written by a newer fewscan"):
        stage.execute(_cfg(methods=["protonet"]), FakeRun(tmp_path / "run2"), up)  # type: ignore[arg-type]
