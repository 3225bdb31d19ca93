"""The generated 2D study: DICOM files agree with labels.csv, vendor variety, junk, adapt sets."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import RLELossless

from pipeline.demodata.prevalence import FINDINGS, NORMAL
from tests.demodata.helpers import all_files, display_pixels, read_labels

# The junk includes a truncated DICOM on purpose; pydicom warns when it reads one.
pytestmark = pytest.mark.filterwarnings("ignore:End of file reached")


def _classify(out):
    """Every file under dicom/: readable image / readable non-image (SR) / broken (unreadable, or cut short)."""
    images, non_images, broken = {}, [], []
    for p in all_files(out / "dicom"):
        try:
            ds = pydicom.dcmread(p)
            if "PixelData" in ds:
                ds.pixel_array  # noqa: B018 - decoding is the point
                images[p.name] = (p, ds)
            elif ds.get("Modality") == "SR":
                non_images.append((p, ds))
            else:  # an image object cut off before its pixel data
                broken.append(p)
        except (InvalidDicomError, EOFError, ValueError, OSError, AttributeError, KeyError):
            broken.append(p)
    return images, non_images, broken


def test_files_read_back_and_agree_with_labels(tiny_study):
    out, summary = tiny_study
    labels = read_labels(out)
    assert labels["Image Index"].is_unique
    images, _, _ = _classify(out)
    assert len(images) == summary["n_images"] == 60
    rows = labels.set_index("Image Index")
    for name, (path, ds) in images.items():
        row = rows.loc[name]  # every readable image has its label row, keyed by basename
        assert ds.PatientID == row["Patient ID"]
        assert ds.PatientSex == row["Patient Gender"]
        assert int(ds.PatientAge[:3]) == row["Patient Age"]
        assert ds.ViewPosition == row["View Position"]
        assert ds.pixel_array.shape == (64, 64)
        assert ds.Modality == "DX"
        # PACS-like tree: dicom/<PatientID>/<date>_<accession>/<series>/<file>
        rel = path.relative_to(out / "dicom").parts
        assert len(rel) == 4 and rel[0] == ds.PatientID and rel[1] == f"{ds.StudyDate}_{ds.AccessionNumber}"
    # Follow-ups: per patient numbered 0..n-1 and in date order.
    by_patient = {}
    for name, (_, ds) in images.items():
        row = rows.loc[name]
        by_patient.setdefault(ds.PatientID, []).append((int(row["Follow-up #"]), ds.StudyDate))
    assert max(len(v) for v in by_patient.values()) >= 2
    for visits in by_patient.values():
        dates = [d for _, d in sorted(visits)]
        assert dates == sorted(dates)
    # Both naming styles occur: with and without .dcm.
    assert any(n.endswith(".dcm") for n in images) and any("." not in n for n in images)


def test_label_counts_match_summary_and_table_order(tiny_study):
    out, summary = tiny_study
    labels = read_labels(out)
    images = {p.name for p in all_files(out / "dicom")}
    real = labels[labels["Image Index"].isin(images)]
    counts = Counter(lab for s in real["Finding Labels"] for lab in s.split("|"))
    # Junk rows (truncated / missing files) are all "No Finding", so finding counts are exact.
    for f in FINDINGS:
        assert counts[f] == summary["counts"][f]
    seq = [counts[f] for f in FINDINGS]
    assert seq == sorted(seq, reverse=True)
    assert all(NORMAL not in s or s == NORMAL for s in labels["Finding Labels"])


def test_header_is_a_full_export_header(tiny_study):
    out, _ = tiny_study
    images, _, _ = _classify(out)
    _, ds = next(iter(images.values()))
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "InstitutionName",
               "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate",
               "Manufacturer", "ManufacturerModelName", "PixelSpacing", "PhotometricInterpretation",
               "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):  # fmt: skip
        assert kw in ds and str(ds.data_element(kw).value) != "", kw
    assert "^" in str(ds.PatientName)
    uids = [ds.SOPInstanceUID for _, ds in images.values()]
    assert len(set(uids)) == len(uids)


def test_vendor_variety(tiny_study):
    out, summary = tiny_study
    images, _, _ = _classify(out)
    dss = [ds for _, ds in images.values()]
    assert {ds.PhotometricInterpretation for ds in dss} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({ds.BitsStored for ds in dss}) >= 2 and all(12 <= ds.BitsStored <= 16 for ds in dss)
    assert len({ds.Manufacturer for ds in dss}) >= 3
    assert any(ds.file_meta.TransferSyntaxUID == RLELossless for ds in dss)
    assert any(float(ds.RescaleSlope) != 1.0 or float(ds.RescaleIntercept) != 0.0 for ds in dss)
    assert any(not ds.file_meta.TransferSyntaxUID.is_implicit_VR for ds in dss)
    assert any(ds.file_meta.TransferSyntaxUID.is_implicit_VR for ds in dss)
    # Stored values fit the declared bit depth; after the modality LUT + inversion the lungs are darker
    # than the mediastinum for every vendor (so the conventions were applied consistently).
    for ds in dss:
        assert int(ds.pixel_array.max()) < (1 << ds.BitsStored)
        x = display_pixels(ds)
        assert x[20:40, 28:36].mean() > x[20:40, 10:20].mean()
    assert summary["rle_files"] > 0


def test_junk_is_present_and_realistic(tiny_study):
    out, summary = tiny_study
    images, non_images, broken = _classify(out)
    assert summary["junk"] == {"truncated": 1, "sr": 1, "not_dicom": 1, "missing_image": 1}
    assert any(ds.Modality == "SR" for _, ds in non_images)
    names = {p.name for p in broken}
    labels = read_labels(out)
    listed = set(labels["Image Index"])
    assert len(broken) == 2  # a truncated DICOM (with a label row) and a non-DICOM file (without)
    assert len(names & listed) == 1
    on_disk = {p.name for p in all_files(out / "dicom")}
    missing = listed - on_disk
    assert len(missing) == 1  # a label row whose image does not exist
    assert len(labels) == summary["n_images"] + 2


def test_adapt_sets_are_fresh_patients(tiny_study):
    out, _ = tiny_study
    labels = read_labels(out)
    study_patients = set(labels["Patient ID"])
    seen = {}
    for role, k in (("support", 2), ("query", 3)):
        for cls in ("Hernia", NORMAL):
            files = sorted((out / "adapt" / role / cls).glob("*.dcm"))
            assert len(files) == k
            for f in files:
                ds = pydicom.dcmread(f)
                assert ds.pixel_array.shape == (64, 64)
                assert ds.PatientID not in study_patients
                seen.setdefault(role, set()).add(ds.PatientID)
    assert not seen["support"] & seen["query"]
    assert len(seen["support"]) == 4 and len(seen["query"]) == 6


def test_study_json_records_parameters(tiny_study):
    out, summary = tiny_study
    meta = json.loads((out / "study.json").read_text())
    assert meta["parameters"]["seed"] == 3 and meta["parameters"]["n_images"] == 60
    assert meta["summary"]["counts"] == summary["counts"]


def test_refuses_a_foreign_folder(tmp_path):
    from pipeline.demodata.generate import generate_study
    from pipeline.errors import DataError

    (tmp_path / "thesis.docx").write_text("mine")
    with pytest.raises(DataError, match="not a generated study"):
        generate_study(tmp_path, n_images=30, size=32, min_per_finding=1, workers=1)
    assert (tmp_path / "thesis.docx").read_text() == "mine"


def test_temp_files_of_a_killed_write_do_not_make_the_folder_foreign(tmp_path):
    from pipeline.atomic import atomic_open
    from pipeline.demodata.generate import _prepare_out
    from pipeline.errors import DataError

    def leftover(name):  # the temp file atomic_open makes for `name`, as a kill mid-write leaves it
        before = {p.name for p in tmp_path.iterdir()}
        with pytest.raises(KeyboardInterrupt), atomic_open(tmp_path / name) as f:
            (temp,) = {p.name for p in tmp_path.iterdir()} - before
            f.write("half")
            raise KeyboardInterrupt
        (tmp_path / temp).write_text("half")
        return temp

    (tmp_path / "salt").write_text("s\n")
    (tmp_path / "labels.csv").write_text("old")
    left = [leftover("labels.csv"), leftover(".fewscan-demo.json"), leftover("study.json")]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in left) and len(set(left)) == 3
    _prepare_out(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["salt"]  # the salt is rewritten only if it differs
    foreign = leftover("thesis.docx")
    with pytest.raises(DataError, match="not a generated study"):
        _prepare_out(tmp_path)
    assert (tmp_path / foreign).read_text() == "half"


def test_bad_arguments_name_the_fix(tmp_path):
    from pipeline.demodata.generate import generate_study
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="modality"):
        generate_study(tmp_path / "a", n_images=30, modality="MR")
    with pytest.raises(ConfigError, match="adapt_condition"):
        generate_study(tmp_path / "b", n_images=30, adapt_condition="Flu")
    with pytest.raises(ConfigError, match="min_per_finding"):
        generate_study(tmp_path / "c", n_images=30, min_per_finding=40)
    assert not (tmp_path / "a").exists()


def test_lungs_are_darker_than_soft_tissue_on_average(tiny_study):
    out, _ = tiny_study
    images, _, _ = _classify(out)
    vals = np.array([display_pixels(ds)[16:40, 8:22].mean() < display_pixels(ds)[52:60, 8:56].mean()
                     for _, ds in images.values()])  # fmt: skip
    assert vals.mean() > 0.9  # lung field vs upper abdomen


def test_cr_modality_writes_computed_radiography_objects(tmp_path):
    from pipeline.demodata.dicomio import CR_IMAGE
    from pipeline.demodata.generate import generate_study

    generate_study(tmp_path / "cr", n_images=30, size=32, modality="CR", min_per_finding=1, workers=1,
                   adapt_support_per_class=0, adapt_query_per_class=0)  # fmt: skip
    images, _, _ = _classify(tmp_path / "cr")
    assert len(images) == 30
    assert {ds.Modality for _, ds in images.values()} == {"CR"}
    assert {ds.SOPClassUID for _, ds in images.values()} == {CR_IMAGE}
