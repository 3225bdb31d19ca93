"""NIfTI, PNG/JPEG and MedMNIST npz into the same stored layout as DICOM."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.ingest import reasons as R
from pipeline.ingest.discover import discover, sniff
from pipeline.ingest.manifest import PreprocessConfig
from pipeline.ingest.reasons import Rejected
from pipeline.ingest.worker import decode_file


def _dec(p: Path, fmt: str, **prep_kw):
    prep = PreprocessConfig(**prep_kw).model_dump(mode="json")
    prep.update(_label_names=["normal", "nodule", "mass"], _npz_splits=["train", "val", "test"])
    return decode_file(p, fmt, p.read_bytes(), prep)


def test_png_8_and_16_bit_scaled_by_bit_depth_and_rgb_to_luminance(tmp_path: Path) -> None:
    g8 = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    Image.fromarray(g8).save(tmp_path / "g8.png")
    g16 = g8.astype(np.uint16) * 257
    Image.fromarray(g16).save(tmp_path / "g16.png")
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 1] = 255  # pure green -> luminance 0.587
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    ((a8, f8),) = _dec(tmp_path / "g8.png", "png", image_size=[16, 16])
    ((a16, _),) = _dec(tmp_path / "g16.png", "png", image_size=[16, 16])
    ((argb, _),) = _dec(tmp_path / "rgb.png", "png", image_size=[16, 16])
    np.testing.assert_allclose(a8[0].astype(np.float32), g8 / 255.0, atol=1e-3)
    np.testing.assert_allclose(a16.astype(np.float32), a8.astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(argb.astype(np.float32), 0.587, atol=1e-3)
    assert f8["source_format"] == "png" and f8["orig_shape"] == [16, 16]
    ((a3, _),) = _dec(tmp_path / "g8.png", "png", image_size=[16, 16], channels=3)
    assert a3.shape == (3, 16, 16) and np.array_equal(a3[0], a3[2])


def test_jpeg_found_by_content_even_with_a_png_name(tmp_path: Path) -> None:
    img = np.full((10, 20), 200, np.uint8)
    img[:4, -4:] = 0  # not constant (a constant image is rejected)
    Image.fromarray(img).save(tmp_path / "x.png", format="JPEG")
    assert sniff(tmp_path / "x.png") == "jpeg"
    ((a, _),) = _dec(tmp_path / "x.png", "jpeg", image_size=[16, 16])
    assert a.shape == (1, 16, 16)
    assert float(a[0, 8, 8]) == pytest.approx(200 / 255, abs=0.02) and float(a[0, 0, 8]) == 0.0  # padded rows


def test_nifti_3d_canonical_orientation_and_spacing(tmp_path: Path) -> None:
    data = np.zeros((10, 12, 6), np.float32)  # (x, y, z)
    data[..., :] = np.arange(6, dtype=np.float32)  # brighter towards superior
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[0, 0] = -1.0  # stored left-right flipped: canonical reorientation undoes it
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "vol.nii.gz")
    assert sniff(tmp_path / "vol.nii.gz") == "nifti"
    ((a, facts),) = _dec(
        tmp_path / "vol.nii.gz", "nifti", spatial_dims=3, image_size=[6, 12, 10], spacing=[2.0, 1.0, 1.0]
    )
    assert a.shape == (1, 6, 12, 10) and facts["spacing"] == (2.0, 1.0, 1.0)
    centre = a[0, :, 6, 5].astype(np.float32)
    np.testing.assert_allclose(centre, np.arange(6) / 5, atol=2e-3)
    with pytest.raises(Rejected) as e:
        _dec(tmp_path / "vol.nii.gz", "nifti", image_size=[16, 16])
    assert e.value.reason == R.WRONG_DIMENSIONALITY


def test_nifti_2d_and_manifest_window(tmp_path: Path) -> None:
    img = np.linspace(-1000, 1000, 16 * 16, dtype=np.float32).reshape(16, 16)
    nib.save(nib.Nifti1Image(img[:, :, None], np.eye(4)), tmp_path / "slice.nii")
    ((a, _),) = _dec(
        tmp_path / "slice.nii",
        "nifti",
        image_size=[16, 16],
        voi="manifest",
        window={"center": 0, "width": 400},
    )
    assert a.shape == (1, 16, 16)
    vals = a.astype(np.float32)
    assert vals.min() == 0 and vals.max() == 1 and 0.3 < float((vals == 1).mean()) < 0.5  # HU window clips


def _medmnist(path: Path, n: int, shape: tuple[int, ...], labels: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)


def test_medmnist_npz_single_label_2d(tmp_path: Path) -> None:
    _medmnist(tmp_path / "pneumoniamnist.npz", 3, (28, 28), np.array([[0], [2], [1]]))
    items = _dec(tmp_path / "pneumoniamnist.npz", "npz", image_size=[28, 28])
    assert len(items) == 9
    assert [f["labels"] for _, f in items[:3]] == [["normal"], ["mass"], ["nodule"]]
    assert [f["npz_split"] for _, f in items[::3]] == ["train", "val", "test"]
    raw = np.load(tmp_path / "pneumoniamnist.npz")["train_images"][1]
    np.testing.assert_allclose(items[1][0][0].astype(np.float32), raw / 255.0, atol=2e-3)


def test_medmnist_npz_multi_label_and_3d(tmp_path: Path) -> None:
    _medmnist(tmp_path / "chest.npz", 2, (28, 28), np.array([[0, 1, 1], [0, 0, 0]]))
    items = _dec(tmp_path / "chest.npz", "npz", image_size=[28, 28])
    assert items[0][1]["labels"] == ["nodule", "mass"] and items[1][1]["labels"] == []
    _medmnist(tmp_path / "organ3d.npz", 2, (28, 28, 28), np.array([[1], [0]]))
    items3 = _dec(tmp_path / "organ3d.npz", "npz", spatial_dims=3, image_size=[28, 28, 28])
    assert items3[0][0].shape == (1, 28, 28, 28) and items3[0][1]["labels"] == ["nodule"]
    with pytest.raises(Rejected) as e:
        _dec(tmp_path / "organ3d.npz", "npz", image_size=[28, 28])
    assert e.value.reason == R.WRONG_DIMENSIONALITY


def test_discover_recurses_by_content_and_skips_hidden(tmp_path: Path) -> None:
    from tests.ingest.conftest import make_dicom

    make_dicom(tmp_path / "a" / "b" / "c" / "IM0001", np.zeros((4, 4), np.uint16))
    make_dicom(tmp_path / "a" / "no_preamble", np.zeros((4, 4), np.uint16), preamble=False)
    (tmp_path / "a" / "notes.dcm").write_text("not dicom at all")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    found = {c.rel: c.fmt for c in discover(tmp_path)}
    assert found == {"a/b/c/IM0001": "dicom", "a/no_preamble": "dicom", "a/notes.dcm": "unknown"}
