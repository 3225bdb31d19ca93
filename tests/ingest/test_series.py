"""3D: slices grouped by series, ordered along the slice normal, uneven gaps detected, MONAI resampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import CTImageStorage, generate_uid

from pipeline.ingest import reasons as R
from pipeline.ingest.manifest import PreprocessConfig
from pipeline.ingest.reasons import Rejected
from pipeline.ingest.worker import decode_series
from tests.ingest.conftest import make_dicom

# an oblique plane: rows along (1, 0, 0), columns along (0, cos, sin) -> normal (0, -sin, cos)
ANGLE = np.deg2rad(30)
ORI = [1.0, 0.0, 0.0, 0.0, float(np.cos(ANGLE)), float(np.sin(ANGLE))]
NORMAL = np.array([0.0, -np.sin(ANGLE), np.cos(ANGLE)])


def _series(
    folder: Path, offsets: list[float], rng: np.random.Generator, series_uid: str | None = None
) -> list[Path]:
    """One slice per offset along the normal; slice value = 100 * rank of its offset; written shuffled,
    with InstanceNumber shuffled too (ordering must come from the geometry)."""
    uid = series_uid or generate_uid()
    study = generate_uid()
    ranks = np.argsort(np.argsort(offsets))
    paths = []
    for i in rng.permutation(len(offsets)):
        pos = np.array([-5.0, 3.0, 7.0]) + offsets[i] * NORMAL
        px = np.full((16, 16), 100 * ranks[i] + 50, np.int16)
        paths.append(
            make_dicom(
                folder / f"IM{rng.integers(1e6):06d}",
                px,
                sop_class=CTImageStorage,
                series_uid=uid,
                study_uid=study,
                Modality="CT",
                ImagePositionPatient=[float(v) for v in pos],
                ImageOrientationPatient=ORI,
                PixelSpacing=[1.0, 1.0],
                InstanceNumber=int(rng.integers(1, 999)),
                RescaleSlope=1,
                RescaleIntercept=0,
            )
        )
    return paths


def _prep(**kw: Any) -> dict[str, Any]:
    return PreprocessConfig(spatial_dims=3, image_size=[8, 16, 16], voi="minmax", **kw).model_dump(
        mode="json"
    )


def _load(paths: list[Path], prep: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    return decode_series([(p, p.read_bytes()) for p in paths], prep)


def test_shuffled_series_is_ordered_along_the_normal(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths = _series(tmp_path, [float(z) for z in range(8)], rng)
    vol, facts = _load(paths, _prep())
    assert vol.shape == (1, 8, 16, 16)
    centre = vol[0, :, 8, 8].astype(np.float32)
    np.testing.assert_allclose(centre, np.arange(8) / 7, atol=2e-3)  # increasing = geometric order
    assert facts["n_slices"] == 8 and not facts["uneven_gaps"] and facts["spacing"][0] == pytest.approx(1.0)


def test_uneven_gaps_are_detected_and_interpolated_or_rejected(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    offsets = [0.0, 1.0, 2.0, 3.0, 6.0, 7.0]  # two slices missing between 3 and 6
    paths = _series(tmp_path, offsets, rng)
    vol, facts = _load(paths, dict(_prep(), image_size=[8, 16, 16]))
    assert facts["uneven_gaps"] and facts["gap_deviation"] == pytest.approx(2.0)
    centre = vol[0, :, 8, 8].astype(np.float32)
    # regular 1 mm grid 0..7 (8 slices): the missing positions 4 and 5 are interpolated between ranks 3 and 4
    stored = np.array([0, 1, 2, 3, 3 + 1 / 3, 3 + 2 / 3, 4, 5]) / 5
    np.testing.assert_allclose(centre, stored, atol=3e-3)
    with pytest.raises(Rejected) as e:
        _load(paths, _prep(uneven_series="reject"))
    assert e.value.reason == R.INCONSISTENT_SERIES and "uneven" in e.value.detail


def test_duplicate_position_and_mixed_sizes_are_inconsistent(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    paths = _series(tmp_path / "a", [0.0, 1.0, 1.0, 2.0], rng)
    with pytest.raises(Rejected) as e:
        _load(paths, _prep())
    assert e.value.reason == R.INCONSISTENT_SERIES
    paths = _series(tmp_path / "b", [0.0, 1.0, 2.0], rng)
    make_dicom(
        paths[0],
        np.zeros((8, 8), np.int16),
        sop_class=CTImageStorage,
        ImagePositionPatient=[0, 0, 9],
        ImageOrientationPatient=ORI,
    )
    with pytest.raises(Rejected) as e:
        _load(paths, _prep())
    assert e.value.reason == R.INCONSISTENT_SERIES


def test_resampled_to_target_spacing_with_monai(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    paths = _series(tmp_path, [2.0 * z for z in range(4)], rng)  # 4 slices 2 mm apart: 8 mm deep
    vol, facts = _load(paths, _prep(spacing=[1.0, 2.0, 2.0]))
    assert vol.shape == (1, 8, 16, 16)
    # 16x16 px at 1 mm -> 8x8 at 2 mm, centred in 16x16 with zero padding
    assert float(np.abs(vol[0, :, :4, :]).max()) == 0.0 and float(vol[0, 4, 8, 8]) > 0
    centre = vol[0, :, 8, 8].astype(np.float32)
    assert np.all(np.diff(centre) >= -1e-3) and centre[-1] > centre[0]


def test_3d_ingest_groups_series_labels_by_folder_and_rejects_duplicates(tmp_path: Path) -> None:
    from pipeline.ingest.build import build_store
    from pipeline.ingest.manifest import IngestConfig

    rng = np.random.default_rng(5)
    a = _series(tmp_path / "scans" / "P1" / "SER_A", [float(z) for z in range(5)], rng)
    _series(tmp_path / "scans" / "P1" / "SER_B", [float(z) for z in range(4)], rng)
    dup = tmp_path / "scans" / "P1" / "SER_A" / "copy_of_first"
    dup.write_bytes(a[0].read_bytes())  # same SOPInstanceUID twice in one series
    (tmp_path / "scans" / "P1" / "SER_A" / "report.txt").write_text("not an image")
    c = _series(tmp_path / "scans" / "P2" / "SER_C", [float(z) for z in range(3)], rng)
    c[1].write_bytes(c[1].read_bytes()[:-100])  # one truncated slice spoils its series
    (tmp_path / "labels.csv").write_text(
        "Image Index,Finding Labels\nSER_A,Mass\nSER_B,No Finding\nSER_C,Mass\n"
    )
    cfg = IngestConfig.model_validate({
        "name": "ct", "scans": {"root": str(tmp_path / "scans")}, "workers": 1,
        "labels": {"path": str(tmp_path / "labels.csv"), "key_column": "Image Index", "label_column": "Finding Labels"},
        "preprocess": {"spatial_dims": 3, "image_size": [8, 16, 16], "voi": "minmax"},
    })  # fmt: skip
    s = build_store(cfg, tmp_path / "out")
    assert s.n_images == 2 and s.label_counts == {"Mass": 1, "No Finding": 1}
    # SER_C: its 3 slices rejected as unreadable, and its label row is not a "label for a missing file"
    assert s.reasons == {"duplicate_sop_instance": 1, "unreadable": 4}
    assert list(s.index["source_format"]) == ["dicom_series"] * 2 and s.meta["spatial_dims"] == 3
    assert sorted(s.index["orig_shape"]) == ["4x16x16", "5x16x16"]
    images = np.load(tmp_path / "out" / "store" / "images.npy", mmap_mode="r")
    assert images.shape == (2, 1, 8, 16, 16)


def test_multiframe_kept_as_a_volume_in_3d(tmp_path: Path) -> None:
    from pipeline.ingest.worker import decode_file

    frames = np.stack([np.full((16, 16), 10 * i, np.uint16) for i in range(8)])
    p = make_dicom(tmp_path / "enh", frames, Modality="CT", PixelSpacing=[1.0, 1.0], SpacingBetweenSlices=1.0)
    ((vol, facts),) = decode_file(p, "dicom", p.read_bytes(), _prep(multiframe="volume"))
    assert vol.shape == (1, 8, 16, 16) and facts["orig_shape"] == [8, 16, 16]
    np.testing.assert_allclose(
        vol[0, :, 8, 8].astype(np.float32), np.arange(8) / 7, atol=2e-3
    )  # frame order kept
