"""Reading support/query sets: layout, class order, de-identification and every refusal path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.adapt.config import AdaptConfig
from pipeline.adapt.listing import list_inputs, list_labelled
from pipeline.adapt.scan_spec import ScanMismatch, ScanSpec
from pipeline.adapt.stage import overrides_from_args
from pipeline.adapt.support import load_labelled, order_classes
from pipeline.config import apply_overrides, validate
from pipeline.errors import ConfigError, DataError
from pipeline.names import adapted_model_name
from tests.adapt import helpers as h

SALT = b"0" * 64


def spec(
    modalities: frozenset[str] | None = frozenset({"DX"}), shape: tuple[int, ...] = (1, h.SIZE, h.SIZE)
) -> ScanSpec:
    return ScanSpec(preprocessing=h.preprocessing(), shape=shape, modalities=modalities)


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_folder_set_is_read_in_a_fixed_order_with_the_condition_first(sets: dict[str, Path]) -> None:
    refs = list_labelled(sets["support"])
    assert [r.label for r in refs] == [h.CONDITION] * 5 + [h.NORMAL] * 5
    assert refs == list_labelled(sets["support"])  # deterministic
    classes = order_classes([str(r.label) for r in refs], None, h.NORMAL)
    assert classes == [h.CONDITION, h.NORMAL]
    s = load_labelled(refs, classes, spec(), SALT, min_per_class=5)
    assert s.x.shape == (10, 1, h.SIZE, h.SIZE) and s.x.dtype.is_floating_point
    assert s.y.tolist() == [0] * 5 + [1] * 5
    assert s.counts() == {h.CONDITION: 5, h.NORMAL: 5}
    # the arrays are exactly what ingest stores (min-max window, float16 precision)
    assert float(s.x.min()) == 0.0 and float(s.x.max()) == 1.0
    assert len(set(s.keys)) == 10


def test_class_order_puts_normal_last_and_others_between() -> None:
    assert order_classes(["b", "No Finding", "Hernia", "a"], "Hernia", "No Finding") == [
        "Hernia",
        "a",
        "b",
        "No Finding",
    ]
    with pytest.raises(ConfigError, match="cannot tell which class is the condition"):
        order_classes(["a", "b", "No Finding"], None, "No Finding")
    with pytest.raises(ConfigError, match="'Mass' is not a class.*Hernia, No Finding"):
        order_classes(["Hernia", "No Finding"], "Mass", "No Finding")
    with pytest.raises(DataError, match="at least two"):
        order_classes(["Hernia"], None, "No Finding")


def test_label_csv_resolves_relative_paths(sets: dict[str, Path], tmp_path: Path) -> None:
    d = copy_set(sets["support"], tmp_path / "s")
    rows = ["path,label"] + [f"{p.relative_to(d)},{p.parent.name}" for p in sorted(d.rglob("*.dcm"))]
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    refs = list_labelled(d / "labels.csv")
    assert len(refs) == 10 and {r.label for r in refs} == {h.CONDITION, h.NORMAL}
    assert all(r.path.is_file() for r in refs)
    (tmp_path / "bad.csv").write_text("file,diagnosis\na.dcm,x\n")
    with pytest.raises(ConfigError, match="needs the columns 'path' and 'label'; it has: file, diagnosis"):
        list_labelled(tmp_path / "bad.csv")


def test_empty_class_folder_is_refused_by_name(sets: dict[str, Path], tmp_path: Path) -> None:
    d = copy_set(sets["support"], tmp_path / "s")
    (d / "Mass").mkdir()
    (d / "Mass" / "README.txt").write_text("not a scan")
    with pytest.raises(DataError, match="class folder 'Mass'.*holds no scan files"):
        list_labelled(d)
    with pytest.raises(ConfigError, match="support set not found"):
        list_labelled(tmp_path / "nope")


def test_unreadable_scan_is_reported_and_adaptation_set_goes_on(
    sets: dict[str, Path], tmp_path: Path
) -> None:
    d = copy_set(sets["support"], tmp_path / "s")
    (d / h.CONDITION / "broken.dcm").write_bytes(b"DICM but not really" * 10)
    refs = list_labelled(d)
    s = load_labelled(refs, [h.CONDITION, h.NORMAL], spec(), SALT, min_per_class=5)
    assert s.counts() == {h.CONDITION: 5, h.NORMAL: 5}
    assert len(s.rejected) == 1 and s.rejected[0].ref.path.name == "broken.dcm"
    rep = s.report()
    assert rep["rejected"][0]["label"] == h.CONDITION and "unreadable" in rep["rejected"][0]["reason"]
    # the MLflow-bound report names scans only by salted keys: no file names, folders or patient ids
    text = json.dumps(rep)
    assert "broken" not in text and "scan_0" not in text and str(tmp_path) not in text and "SYN" not in text
    assert s.local_report()["rejected"][0]["path"].endswith("broken.dcm")


def test_too_few_scans_for_a_class_names_the_class_and_counts(sets: dict[str, Path], tmp_path: Path) -> None:
    d = copy_set(sets["support"], tmp_path / "s")
    for p in sorted((d / h.CONDITION).glob("*.dcm"))[:3]:
        p.write_bytes(b"garbage")  # 2 readable scans of the condition remain
    with pytest.raises(
        DataError, match=r"too few support scans: 'Hernia': 2 readable \(3 unreadable\).*at least 4"
    ):
        load_labelled(list_labelled(d), [h.CONDITION, h.NORMAL], spec(), SALT, min_per_class=4)


def test_other_modality_refuses_the_whole_set(sets: dict[str, Path], tmp_path: Path) -> None:
    d = copy_set(sets["support"], tmp_path / "s")
    h.write_dicom(
        d / h.NORMAL / "ct.dcm",
        h.render("normal", np.random.default_rng(0)),
        patient_id="SYN99999",
        modality="CT",
    )
    with pytest.raises(
        ScanMismatch, match="1 of 11 support scans do not match the meta-model.*modality CT.*trained on DX"
    ):
        load_labelled(list_labelled(d), [h.CONDITION, h.NORMAL], spec(), SALT)


def test_other_geometry_refuses_the_set(sets: dict[str, Path]) -> None:
    # a meta-model trained on 3-channel images cannot take these 1-channel scans as they are
    with pytest.raises(
        ScanMismatch, match=r"10 of 10 .*2-D, 1 channel\(s\), 32x32.*takes 2-D, 3 channel\(s\)"
    ):
        load_labelled(
            list_labelled(sets["support"]), [h.CONDITION, h.NORMAL], spec(shape=(3, h.SIZE, h.SIZE)), SALT
        )


def test_the_same_scan_under_two_labels_is_refused(sets: dict[str, Path], tmp_path: Path) -> None:
    d = copy_set(sets["support"], tmp_path / "s")
    shutil.copy(d / h.CONDITION / "scan_000.dcm", d / h.NORMAL / "copy.dcm")
    with pytest.raises(DataError, match="same scan appears in support classes 'Hernia' and 'No Finding'"):
        load_labelled(list_labelled(d), [h.CONDITION, h.NORMAL], spec(), SALT)


def test_keys_are_salted_content_hashes(sets: dict[str, Path], tmp_path: Path) -> None:
    refs = list_labelled(sets["support"])
    a = load_labelled(refs, [h.CONDITION, h.NORMAL], spec(), SALT)
    b = load_labelled(refs, [h.CONDITION, h.NORMAL], spec(), b"1" * 64)
    assert a.keys != b.keys  # another salt, other keys
    d = copy_set(sets["support"], tmp_path / "renamed")
    for p in d.rglob("*.dcm"):
        p.rename(p.with_name("x" + p.name))
    c = load_labelled(list_labelled(d), [h.CONDITION, h.NORMAL], spec(), SALT)
    assert sorted(c.keys) == sorted(a.keys)  # renaming a file does not change its key


def test_inputs_for_predict_are_a_file_or_every_scan_of_a_folder(sets: dict[str, Path]) -> None:
    one = next(sets["query"].rglob("*.dcm"))
    assert [r.path for r in list_inputs(one)] == [one]
    assert len(list_inputs(sets["query"])) == 30
    with pytest.raises(ConfigError, match="input not found"):
        list_inputs(sets["query"] / "nope")


def test_config_defaults_validation_and_path_hiding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = validate(
        {"support": "data/Patient Doe/support", "condition": "Pleural Thickening"}, AdaptConfig, "t"
    )
    name = cfg.registry_name("chest", "Pleural Thickening")
    assert name == adapted_model_name("chest", "Pleural Thickening")
    assert name.startswith("fewscan-chest-pleural-thickening-")
    assert (
        validate({**cfg.model_dump(), "register_name": "mine"}, AdaptConfig, "t").registry_name("chest", "x")
        == "mine"
    )
    with pytest.raises(
        ConfigError, match="register_name 'a@b' is not a usable registered model name: it contains '@'"
    ):
        validate({"support": "s", "register_name": "a@b"}, AdaptConfig, "t")
    assert cfg.alias == "latest" and cfg.steps is None and cfg.lr is None
    from pipeline.adapt.stage import public_config

    logged = public_config(cfg)  # what MLflow gets: no folder path in clear
    assert logged["support"].startswith("path:") and "Doe" not in json.dumps(logged)
    assert logged["support"] == public_config(cfg)["support"] and logged["condition"] == "Pleural Thickening"
    with pytest.raises(ConfigError, match="alias 'v3' is not a valid MLflow alias"):
        validate({"support": "s", "alias": "v3"}, AdaptConfig, "t")
    with pytest.raises(ConfigError, match="unknown key 'step'.*Did you mean 'steps'"):
        validate({"support": "s", "step": 3}, AdaptConfig, "t")
    with pytest.raises(ConfigError, match="lr"):
        validate({"support": "s", "lr": -1}, AdaptConfig, "t")


def test_command_line_options_map_onto_the_config() -> None:
    import argparse

    from pipeline.adapt.stage import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        [
            "--support",
            "a: b/x",
            "--condition",
            "No: Finding",
            "--steps",
            "7",
            "--lr",
            "0.05",
            "--method",
            "maml",
        ]
    )
    cfg = validate(apply_overrides({}, overrides_from_args(args)), AdaptConfig, "cli")
    assert (str(cfg.support), cfg.condition, cfg.steps, cfg.lr, cfg.method, cfg.query) == (
        "a: b/x",
        "No: Finding",
        7,
        0.05,
        "maml",
        None,
    )


def test_fingerprint_inputs_follow_the_sets_content(
    sets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.adapt.stage import fingerprint_inputs

    monkeypatch.chdir(tmp_path)
    d = copy_set(sets["support"], tmp_path / "s")
    cfg = validate({"support": str(d)}, AdaptConfig, "t")
    before = fingerprint_inputs(cfg)
    assert before == fingerprint_inputs(cfg) and before["query"] is None
    h.write_dicom(
        d / h.CONDITION / "new.dcm", h.render("disc", np.random.default_rng(9)), patient_id="SYN55555"
    )
    assert fingerprint_inputs(cfg)["support"] != before["support"]  # `fewscan run` must re-adapt


def test_primary_method_is_the_first_configured_one_with_a_model() -> None:
    from pipeline.adapt.stage import _primary_method

    assert _primary_method({"methods": '["maml", "protonet"]'}, ["maml", "protonet"]) == "maml"
    assert _primary_method({"methods": '["anil", "protonet"]'}, ["protonet"]) == "protonet"
    assert _primary_method({}, ["maml"]) == "maml"
    assert _primary_method({}, ["maml", "protonet"]) is None


def test_refusals_name_no_path_since_errors_are_recorded_in_mlflow(
    sets: dict[str, Path], tmp_path: Path
) -> None:
    secret = tmp_path / "Doe_Jane_1961"
    d = copy_set(sets["support"], secret / "support")
    (d / "Empty").mkdir()
    for call in (lambda: list_labelled(secret / "nope"), lambda: list_labelled(d)):
        with pytest.raises((ConfigError, DataError)) as info:
            call()
        assert "Doe_Jane" not in str(info.value)
    shutil.rmtree(d / "Empty")
    shutil.copy(d / h.CONDITION / "scan_000.dcm", d / h.NORMAL / "Doe_Jane_copy.dcm")
    with pytest.raises(DataError) as info:
        load_labelled(list_labelled(d), [h.CONDITION, h.NORMAL], spec(), SALT)
    assert "Doe_Jane" not in str(info.value) and "scan_000" not in str(info.value)
