"""Multi-frame DICOM decoded frame by frame (issue 14): a worker's memory stays bounded whatever the
number of frames, and the stored images equal those of the whole-array decode, value for value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import RLELossless

from pipeline.ingest import reasons as R
from pipeline.ingest.dicom_read import decode_frames, read_dataset
from pipeline.ingest.preprocess import finish_2d
from pipeline.ingest.reasons import Rejected
from pipeline.ingest.worker import decode_file
from tests.ingest.conftest import make_dicom

REPO = Path(__file__).parents[2]


def _whole_array(p: Path, prep: dict[str, Any]) -> list[np.ndarray]:
    """The previous path: every frame decoded at once (`decode_frames`), then each frame stored."""
    frames, _ = decode_frames(read_dataset(p.read_bytes()), prep["voi"], prep.get("window"))
    return [finish_2d(frames[i], prep) for i in range(frames.shape[0])]


def _both_ways(p: Path, prep: dict[str, Any]) -> list[list[tuple[np.ndarray, dict[str, Any]]]]:
    """decode_file on the file's bytes (a file small enough to read whole) and from disk (data None:
    a large file, read as it is decoded)."""
    return [decode_file(p, "dicom", p.read_bytes(), prep), decode_file(p, "dicom", None, prep)]


def _frames(n: int, h: int, w: int, seed: int, hi: int = 4096) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, hi, (n, h, w), dtype=np.uint16)


@pytest.mark.parametrize(
    "attrs",
    [
        {},  # min-max over the whole file (an extra pass over the frames)
        {"WindowCenter": 1500, "WindowWidth": 2000, "RescaleSlope": 2, "RescaleIntercept": -1000},
        {"photometric": "MONOCHROME1"},  # min-max, then inverted
        {"compress": RLELossless},  # compressed frames, decoded one by one
    ],
    ids=["minmax", "rescale+window", "monochrome1", "rle"],
)
def test_frame_by_frame_equals_the_whole_array_decode(
    tmp_path: Path, prep2d: dict, attrs: dict[str, Any]
) -> None:
    px = _frames(7, 40, 60, seed=3)
    px[2] //= 4  # frames differ in brightness: min-max must span the file, not each frame
    p = make_dicom(tmp_path / "mf.dcm", px, BitsStored=12, **attrs)
    prep = dict(prep2d, image_size=[20, 30])
    want = _whole_array(p, prep)
    for got in _both_ways(p, prep):
        assert [f["frame"] for _, f in got] == list(range(7))
        for (a, _), b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert got[0][1]["orig_shape"] == [7, 40, 60]
    # the dim frame kept its narrow range: it was not stretched to [0, 1] by a min-max of its own
    assert float(want[2].max()) - float(want[2].min()) < 0.3


def test_colour_multiframe_frame_by_frame_equals_the_whole_array_decode(tmp_path: Path, prep2d: dict) -> None:
    rgb = np.random.default_rng(4).integers(0, 256, (5, 24, 32, 3), dtype=np.uint8)
    p = make_dicom(
        tmp_path / "rgb.dcm", rgb[..., 0], photometric="RGB", SamplesPerPixel=3, PlanarConfiguration=0
    )
    import pydicom

    ds = pydicom.dcmread(p)
    ds.PixelData = rgb.tobytes()
    ds.save_as(p)
    prep = dict(prep2d, image_size=[24, 32], channels=3)
    want = _whole_array(p, prep)
    for got in _both_ways(p, prep):
        assert len(got) == 5 and got[0][1]["voi_rule"] == "rgb_bitdepth"
        assert got[0][1]["orig_shape"] == [5, 24, 32, 3]
        for (a, _), b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(want[1].astype(np.float32), rgb[1].transpose(2, 0, 1) / 255.0, atol=1e-3)


def test_first_frame_and_constant_frames_as_before(tmp_path: Path, prep2d: dict) -> None:
    px = _frames(4, 16, 16, seed=5)
    px[1] = 700  # a blank frame: dropped, counted
    p = make_dicom(tmp_path / "mf.dcm", px)
    prep = dict(prep2d, image_size=[16, 16])
    want = _whole_array(p, prep)
    for got in _both_ways(p, prep):
        assert [f["frame"] for _, f in got] == [0, 2, 3]
        assert got[0][1]["constant_frames"] == 1
        for (a, _), b in zip(got, [want[0], want[2], want[3]]):
            np.testing.assert_array_equal(a, b)
    for first in _both_ways(p, dict(prep, multiframe="first")):
        assert len(first) == 1 and first[0][1]["frame"] == -1
        np.testing.assert_array_equal(first[0][0], want[0])  # min-max still spans the whole file
    blank = make_dicom(tmp_path / "blank.dcm", np.full((3, 16, 16), 9, np.uint16))
    for data in (blank.read_bytes(), None):
        with pytest.raises(Rejected) as e:
            decode_file(blank, "dicom", data, prep)
        assert e.value.reason == R.CONSTANT_IMAGE


def test_multiframe_without_pixel_data_read_from_disk(tmp_path: Path, prep2d: dict) -> None:
    p = make_dicom(tmp_path / "mf.dcm", _frames(3, 16, 16, seed=6))
    import pydicom

    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    for data in (p.read_bytes(), None):
        with pytest.raises(Rejected) as e:
            decode_file(p, "dicom", data, prep2d)
        assert e.value.reason == R.NO_PIXEL_DATA


# One worker process: a warm-up decode (imports, first buffers), then the large file through run_task
# (hash, decode, store) with ru_maxrss read around it, then the whole-array reference after the
# measurement. ru_maxrss is the process's peak so far, so its growth bounds the large file's extra peak.
_WORKER = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np
    from pipeline.ingest.manifest import PreprocessConfig
    from pipeline.ingest.worker import Task, run_task
    from tests.ingest.test_dicom_multiframe import _whole_array

    prep = PreprocessConfig(image_size=[64, 64]).model_dump(mode="json")

    def run(p):
        r = run_task(Task("file", [p], [Path(p).name], "dicom", prep, b"s" * 32, None))
        assert r.ok, r
        return r

    run(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = run(sys.argv[2])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    want = np.stack(_whole_array(Path(sys.argv[2]), prep))
    print(json.dumps({"grew_kb": after - before, "n": len(res.items),
                      "equal": bool(np.array_equal(res.array, want))}))
    """
)


def test_large_multiframe_file_decodes_in_bounded_memory(tmp_path: Path) -> None:
    # 120 frames of 512 x 512, 12 bits in 16: 63 MB stored. Decoded whole, that is 126 MB of float32 per
    # copy (modality LUT, window, ...) on top of the file's bytes; frame by frame it is ~1 MB per copy.
    px = np.random.default_rng(7).integers(0, 4096, (120, 512, 512), dtype=np.uint16)
    big = make_dicom(tmp_path / "us120.dcm", px, BitsStored=12, Modality="US")
    del px
    small = make_dicom(tmp_path / "us2.dcm", _frames(2, 16, 16, seed=8), BitsStored=12)
    bound_mb = 32  # a quarter of one float32 copy of the whole file (120 MiB), let alone several
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, str(small), str(big)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n"] == 120 and got["equal"], got
    grew_mb = got["grew_kb"] / 1024  # Linux reports ru_maxrss in KiB
    assert grew_mb < bound_mb, f"decoding grew the worker by {grew_mb:.0f} MB"


def test_palette_colour_multiframe_uses_the_whole_files_lut_scale(tmp_path: Path, prep2d: dict) -> None:
    # 16-bit LUT entries: indices < 128 map to values <= 255, indices >= 128 to values up to 65535. Frame 0
    # uses only low indices: scaled on its own it would read 255 as full scale, not 65535.
    idx = np.zeros((3, 8, 8), np.uint8)
    idx[0] = np.arange(64).reshape(8, 8)
    idx[1:] = np.arange(128, 192).reshape(8, 8)
    lut = np.concatenate([np.arange(128) * 2, np.linspace(256, 65535, 128)]).astype("<u2")
    attrs = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")} | {
        f"{c}PaletteColorLookupTableData": lut.tobytes() for c in ("Red", "Green", "Blue")
    }
    p = make_dicom(tmp_path / "pal.dcm", idx, photometric="PALETTE COLOR", **attrs)
    prep = dict(prep2d, image_size=[8, 8], channels=3, min_size=1)
    want = _whole_array(p, prep)
    for got in _both_ways(p, prep):
        assert len(got) == 3
        for (a, _), b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert float(want[0].max()) < 0.01  # 126 / 65535: the file's scale, not frame 0's own


def test_single_frame_and_volume_read_from_disk_equal_the_in_memory_decode(
    tmp_path: Path, prep2d: dict
) -> None:
    one = make_dicom(tmp_path / "one.dcm", _frames(1, 24, 24, seed=9)[0], WindowCenter=2000, WindowWidth=3000)
    prep = dict(prep2d, image_size=[24, 24])
    (a, fa), (b, fb) = (decode_file(one, "dicom", d, prep)[0] for d in (one.read_bytes(), None))
    np.testing.assert_array_equal(a, b)
    assert fa == fb
    vol = make_dicom(tmp_path / "vol.dcm", _frames(4, 16, 16, seed=10))
    prep3 = dict(prep2d, spatial_dims=3, image_size=[4, 16, 16], multiframe="volume")
    (a, _), (b, _) = (decode_file(vol, "dicom", d, prep3)[0] for d in (vol.read_bytes(), None))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 4, 16, 16)


@pytest.mark.parametrize("form", ["no_file_meta_implicit", "no_file_meta_explicit", "deflated"])
def test_multiframe_read_from_disk_in_other_encodings(tmp_path: Path, prep2d: dict, form: str) -> None:
    import warnings

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    p = make_dicom(tmp_path / "mf.dcm", _frames(3, 16, 16, seed=11))
    ds = pydicom.dcmread(p)
    if form == "deflated":  # a deflated stream is read whole (it cannot be entered mid-way)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(p)
    else:  # ACR-NEMA style: no preamble, no file meta; the syntax is inferred while reading
        ds.file_meta, ds.preamble = FileMetaDataset(), None
        ds.save_as(p, implicit_vr=form.endswith("implicit"), little_endian=True, enforce_file_format=False)
    prep = dict(prep2d, image_size=[16, 16])
    want = _whole_array(p, prep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the transfer_syntax_inferred note (worker.run_task records it)
        for got in _both_ways(p, prep):
            assert len(got) == 3
            for (a, _), b in zip(got, want):
                np.testing.assert_array_equal(a, b)
