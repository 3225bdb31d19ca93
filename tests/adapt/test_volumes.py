"""3D support sets: a DICOM series folder (or a NIfTI volume) is one scan, read once with ingest's code.

Every identifier is fake. Volumes are tiny (8 slices of 16x16) so the whole file runs in a few seconds.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom.uid import CTImageStorage, generate_uid

import pipeline.ingest.worker as worker
from pipeline.adapt.adapted import AdaptedClassifier
from pipeline.adapt.listing import list_inputs, list_labelled
from pipeline.adapt.scan_read import scan_units
from pipeline.adapt.scan_spec import ScanMismatch, ScanSpec
from pipeline.adapt.stage import _nll, fit_curve
from pipeline.adapt.support import load_labelled
from pipeline.ingest.preprocess import PREPROCESS_VERSION
from pipeline.ingest.reading import load_for_model
from tests.adapt import helpers as h

SALT = b"0" * 64
D, S = 8, 16  # slices, rows = columns
CLASSES = [h.CONDITION, h.NORMAL]


def prep3d() -> dict[str, Any]:
    from pipeline.ingest.manifest import PreprocessConfig

    prep = PreprocessConfig(spatial_dims=3, image_size=[D, S, S], voi="minmax").model_dump(mode="json")
    prep.update(version=PREPROCESS_VERSION, dtype="float16")
    return prep


def spec3d(modalities: frozenset[str] | None = frozenset({"CT"})) -> ScanSpec:
    return ScanSpec(preprocessing=prep3d(), shape=(1, D, S, S), modalities=modalities)


def render(condition: bool, rng: np.random.Generator) -> np.ndarray:
    """(D, S, S) in [0, 1]: noise, plus a bright ball for the condition."""
    zz, yy, xx = np.mgrid[0:D, 0:S, 0:S].astype(np.float64)
    vol = 0.3 + rng.normal(0, 0.05, (D, S, S))
    if condition:
        c = rng.uniform([2.5, 5, 5], [5.5, 11, 11])
        vol += 0.5 * (((zz - c[0]) * 2) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < 16)
    return np.clip(vol, 0, 1)


def write_series(folder: Path, vol: np.ndarray, patient_id: str, rng: np.random.Generator) -> Path:
    """One CT slice per file; file names in random order (ingest orders by position, not by name)."""
    series, study = generate_uid(), generate_uid()
    names = rng.permutation(len(vol))
    folder.mkdir(parents=True, exist_ok=True)
    for k, sl in enumerate(vol):
        ds = h.dicom_image(np.round(sl * 2000).astype(np.uint16), CTImageStorage, study=study, series=series)
        ds.PatientID, ds.PatientName, ds.Modality = patient_id, "Synthetic^Volume", "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.save_as(folder / f"IM{names[k]:04d}", enforce_file_format=True)
    return folder


def write_nifti(path: Path, vol: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def write_set3d(root: Path, n_series: int, n_nifti: int, seed: int) -> Path:
    """Class folders: `n_series` DICOM series folders (named like patients) and `n_nifti` NIfTI volumes each."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        for i in range(n_series):
            write_series(
                root / cls / f"DOE^PAT{i}" / "CT_SERIES", render(cls == h.CONDITION, rng), f"SYN3{i}", rng
            )
        for i in range(n_nifti):
            write_nifti(root / cls / f"vol_{i}.nii.gz", render(cls == h.CONDITION, rng))
    return root


@pytest.fixture(scope="module")
def set3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_set3d(tmp_path_factory.mktemp("vol") / "support", n_series=3, n_nifti=1, seed=5)


def test_a_series_folder_is_one_scan_decoded_once_exactly_as_ingest_would(
    set3d: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"series": [], "file": 0}
    real_series, real_file = worker.decode_series, worker.decode_file

    def count_series(files: Any, prep: Any) -> Any:
        calls["series"].append(len(files))
        return real_series(files, prep)

    def count_file(*a: Any) -> Any:
        calls["file"] += 1
        return real_file(*a)

    monkeypatch.setattr(worker, "decode_series", count_series)
    monkeypatch.setattr(worker, "decode_file", count_file)
    refs = list_labelled(set3d)
    assert len(refs) == 2 * (3 * D + 1)  # listed per file ...
    s = load_labelled(refs, CLASSES, spec3d(), SALT, min_per_class=4)
    # ... read per scan: 3 series + 1 NIfTI per class, each series decoded once from all its slices
    assert s.x.shape == (8, 1, D, S, S) and s.counts() == {h.CONDITION: 4, h.NORMAL: 4}
    assert calls["series"] == [D] * 6 and calls["file"] == 2
    assert len(set(s.keys)) == 8 and not s.rejected
    monkeypatch.setattr(worker, "decode_series", real_series)
    # the volume is what ingest's load_for_model gives for that series folder (same order, window, size)
    units = scan_units(refs, spec3d())
    first = next(i for i, u in enumerate(units) if u.members)
    expect = load_for_model(units[first].path, prep3d())
    assert units[first].path.name == "CT_SERIES" and len(units[first].members) == D
    np.testing.assert_array_equal(s.x[first].numpy(), expect)


def test_slices_are_stacked_by_position_not_by_file_name(tmp_path: Path) -> None:
    ramp = np.repeat(np.linspace(0.1, 0.9, D)[:, None, None], S, axis=1).repeat(
        S, axis=2
    )  # slice k = k-th value
    root = tmp_path / "s"
    write_series(root / h.CONDITION / "a", ramp, "SYN1", np.random.default_rng(1))  # names shuffled
    write_series(root / h.NORMAL / "b", ramp[::-1].copy(), "SYN2", np.random.default_rng(2))
    s = load_labelled(list_labelled(root), CLASSES, spec3d(), SALT)
    z = s.x[:, 0].mean(dim=(2, 3))  # (scans, D): mean per slice
    assert bool((z[0].diff() > 0).all()) and bool((z[1].diff() < 0).all())


def test_renamed_or_reordered_slices_keep_the_series_key(set3d: Path, tmp_path: Path) -> None:
    a = load_labelled(list_labelled(set3d), CLASSES, spec3d(), SALT)
    d = shutil.copytree(set3d, tmp_path / "renamed")
    for p in d.rglob("IM*"):
        p.rename(p.with_name("x" + p.name))
    b = load_labelled(list_labelled(d), CLASSES, spec3d(), SALT)
    assert sorted(a.keys) == sorted(b.keys)


def test_a_csv_row_may_name_a_series_folder(set3d: Path) -> None:
    rows = ["path,label"] + [
        f"{p.relative_to(set3d)},{p.parent.parent.name}" for p in sorted(set3d.rglob("CT_SERIES"))
    ]
    (set3d / "labels.csv").write_text("\n".join(rows) + "\n")
    try:
        s = load_labelled(list_labelled(set3d / "labels.csv"), CLASSES, spec3d(), SALT, min_per_class=3)
    finally:
        (set3d / "labels.csv").unlink()
    assert s.x.shape == (6, 1, D, S, S) and s.counts() == {h.CONDITION: 3, h.NORMAL: 3}


def test_volumes_for_a_2d_model_and_images_for_a_3d_model_are_refused_by_name(
    set3d: Path, sets: dict[str, Path]
) -> None:
    spec2d = ScanSpec(preprocessing=h.preprocessing(), shape=(1, h.SIZE, h.SIZE), modalities=None)
    nifti_only = [r for r in list_labelled(set3d) if r.path.name.endswith(".nii.gz")]
    with pytest.raises(ScanMismatch, match=r"2 of 2 .*a 3-D volume, but the meta-model takes 2-D images"):
        load_labelled(nifti_only, CLASSES, spec2d, SALT)
    with pytest.raises(
        ScanMismatch, match=r"10 of 10 .*a 2-D image, but the meta-model takes 3-D volumes.*series folder"
    ):
        load_labelled(list_labelled(sets["support"]), CLASSES, spec3d(modalities=None), SALT)


def test_adapting_a_3d_conv4_on_series_lowers_the_support_loss_and_predict_gives_a_row_per_series(
    set3d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.meta.model_io import load_meta_model, save_meta_model
    from pipeline.meta.models import ModelSpec, build_model

    torch.manual_seed(0)
    mspec = ModelSpec(backbone="conv4", filters=4, blocks=2, norm="group", norm_groups=2, head="shared")
    model = build_model(mspec, 1, (D, S, S))
    folder = save_meta_model(
        tmp_path / "mm3d",
        model,
        method="fomaml",
        model_spec=mspec,
        image_shape=(1, D, S, S),
        inner={"steps": 10, "eval_steps": 10, "lr": 0.01, "trainable": "all", "second_order": False},
        extra={"preprocessing": prep3d(), "label_names": CLASSES},
    )
    mm = load_meta_model(folder)
    s = load_labelled(list_labelled(set3d), CLASSES, spec3d(), SALT)
    method = mm.method(steps=10)
    states = fit_curve(method, s.x, s.y, 2, 10)
    y = s.y.numpy()
    loss = [_nll(AdaptedClassifier(mm, method, st, CLASSES, spec3d(), {}).proba(s.x), y) for st in states]
    assert loss[-1] < 0.5 * loss[0] and all(b < a for a, b in zip(loss, loss[1:])), loss

    clf = AdaptedClassifier(mm, method, states[-1], CLASSES, spec3d(), {})
    import pipeline.serving
    from pipeline.adapt.predict import predict

    monkeypatch.setattr(pipeline.serving, "load_adapted", lambda uri: clf)
    inp = shutil.copytree(set3d / h.CONDITION, tmp_path / "new")
    out = tmp_path / "preds.csv"
    (tmp_path / "salt").write_text("b" * 64 + "\n")
    summary = predict(
        "models:/x@latest", inp, out, salt_file=tmp_path / "salt", local_report_dir=tmp_path / "r"
    )
    rows = list(csv.DictReader(out.open()))
    assert (
        summary["n_scans"] == 4 == len(rows) and summary["n_errors"] == 0
    )  # 3 series + 1 NIfTI, not 25 files
    assert sum(r["path"].endswith("CT_SERIES") for r in rows) == 3
    # one row per listed scan, in the listing's order
    units = scan_units(list_inputs(inp), spec3d())
    assert [r["path"] for r in rows] == [str(u.path) for u in units]


def test_adapt_reads_each_series_as_the_same_array_ingest_stores(set3d: Path, tmp_path: Path) -> None:
    # One grouping for both (pipeline/ingest/reading.py group_series): the same class folders, ingested in
    # 3D with folder labels and read as a support set, give the same volumes, bit for bit. A repeated
    # slice (a copy of one slice file: the same SOPInstanceUID) is left out by both.
    from pipeline.ingest.build import build_store
    from pipeline.ingest.manifest import IngestConfig
    from pipeline.ingest.store import ImageStore

    root = shutil.copytree(set3d, tmp_path / "scans")
    series = sorted(root.rglob("CT_SERIES"))
    first = sorted(series[0].iterdir())[0]
    (series[0] / "zz_copy").write_bytes(first.read_bytes())
    cfg = IngestConfig.model_validate({
        "name": "ct3d", "scans": {"root": str(root)}, "workers": 1,
        "labels": {"source": "folders"},
        "preprocess": {"spatial_dims": 3, "image_size": [D, S, S], "voi": "minmax"},
        "cache_dir": str(tmp_path / "cache"), "salt_file": str(tmp_path / "salt"),
        "local_report_dir": str(tmp_path / "reports"),
    })  # fmt: skip
    summary = build_store(cfg, tmp_path / "out")
    assert summary.reasons == {"duplicate_sop_instance": 1}
    store = ImageStore.open(tmp_path / "out" / "store")
    spec = ScanSpec(preprocessing=store.meta["preprocessing"], shape=(1, D, S, S), modalities=None)
    s = load_labelled(list_labelled(root), CLASSES, spec, SALT, min_per_class=4)
    is_series = store.index["source_format"] == "dicom_series"
    assert int(is_series.sum()) == 6 and s.x.shape[0] == 8  # 3 series + 1 NIfTI per class, both ways
    stored = {
        (lab, np.asarray(store.images[row], dtype=np.float32).tobytes())
        for lab, row in zip(store.index["labels"], store.index["store_index"])
    }
    read = {(CLASSES[int(y)], x.numpy().tobytes()) for x, y in zip(s.x, s.y)}
    assert read == stored
