"""The CT variant: series of axial slices with consistent geometry, labels per series, 3D lesions."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from pipeline.demodata.ct import depth_for, render_volume
from tests.demodata.helpers import read_labels


def _series_dirs(out):
    return sorted({p.parent for p in (out / "dicom").rglob("*") if p.is_file() and p.parent.name[:1].isdigit()
                   and len(p.parent.name) == 12})  # fmt: skip


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_series_geometry_is_consistent(tiny_ct):
    out, summary = tiny_ct
    labels = read_labels(out).set_index("Image Index")
    readable = 0
    for folder in _series_dirs(out):
        try:
            slices = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
            for ds in slices:
                ds.pixel_array  # noqa: B018
        except Exception:  # noqa: BLE001 - the truncated-slice junk series
            continue
        readable += 1
        assert folder.name in labels.index  # one label row per series, keyed by the folder name
        assert len(slices) == depth_for(32)
        assert len({ds.SeriesInstanceUID for ds in slices}) == 1
        assert len({ds.SOPInstanceUID for ds in slices}) == len(slices)
        assert all(list(map(float, ds.ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0] for ds in slices)
        assert all((ds.Rows, ds.Columns) == (32, 32) for ds in slices)
        z = sorted(float(ds.ImagePositionPatient[2]) for ds in slices)
        steps = np.diff(z)
        assert np.allclose(steps, float(slices[0].SpacingBetweenSlices), atol=1e-3)
        assert sorted(int(ds.InstanceNumber) for ds in slices) == list(range(1, len(slices) + 1))
        assert {ds.Modality for ds in slices} == {"CT"}
        # Hounsfield units after the modality LUT: air outside the body, soft tissue inside.
        mid = sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))[len(slices) // 2]
        hu = pydicom.pixels.apply_modality_lut(mid.pixel_array, mid)
        assert hu[0, 0] < -900, (folder.name, hu[0, 0])  # air at the corner
        # inside the chest: soft tissue (about 0-60 HU) and lung (about -850 HU)
        inner = hu[12:20, 12:20]
        assert np.any((-100 < inner) & (inner < 100)), (folder.name, inner)
        assert np.any((-950 < inner) & (inner < -700)), (folder.name, inner)
    assert readable == summary["n_images"]
    # Vendors differ: signed and unsigned pixel representation, instance order along z, RLE on some.
    reps = {pydicom.dcmread(next(f.iterdir())).PixelRepresentation for f in _series_dirs(out)[:16]}
    assert reps == {0, 1}


def test_lesions_are_three_dimensional():
    base = render_volume(0, 7, 7, (), 48)
    for finding in ("Nodule", "Mass", "Effusion", "Pneumothorax", "Cardiomegaly", "Hernia"):
        vol = render_volume(0, 7, 7, (finding,), 48)
        changed = np.abs(vol - base) > 100
        assert changed.sum() > 0, finding
        if finding != "Nodule":  # a nodule may sit within one thick slice
            assert np.count_nonzero(changed.any(axis=(1, 2))) >= 2, finding  # spans several slices
