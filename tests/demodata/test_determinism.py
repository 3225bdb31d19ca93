"""Same seed -> byte-identical pixels (whatever the worker count); another seed -> other pixels."""

from __future__ import annotations

import pydicom
import pytest

from pipeline.demodata.generate import generate_study
from tests.demodata.helpers import all_files

# The junk includes a truncated DICOM on purpose; pydicom warns when it reads one.
pytestmark = pytest.mark.filterwarnings("ignore:End of file reached")

SMALL = dict(n_images=40, size=32, min_per_finding=1, adapt_support_per_class=1, adapt_query_per_class=1)


def _pixels(out):
    res = {}
    for p in all_files(out):
        if p.suffix in (".csv", ".json"):
            continue
        try:
            ds = pydicom.dcmread(p)
        except Exception:  # noqa: BLE001 - junk files are compared as bytes below
            res[str(p.relative_to(out))] = p.read_bytes()
            continue
        res[str(p.relative_to(out))] = ds.PixelData if "PixelData" in ds else b""
    return res


def test_same_seed_is_byte_identical_across_worker_counts(tmp_path):
    a = generate_study(tmp_path / "a", seed=11, workers=1, **SMALL)  # type: ignore[arg-type]
    b = generate_study(tmp_path / "b", seed=11, workers=2, **SMALL)  # type: ignore[arg-type]
    pa, pb = _pixels(tmp_path / "a"), _pixels(tmp_path / "b")
    assert pa.keys() == pb.keys() and len(pa) > 40
    assert all(pa[k] == pb[k] for k in pa)
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (tmp_path / "b" / "labels.csv").read_bytes()
    # Whole files too (headers, UIDs, dates): nothing reads the clock.
    files = [p for p in all_files(tmp_path / "a" / "dicom")]
    assert all(p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes() for p in files)
    assert a["counts"] == b["counts"]

    c = generate_study(tmp_path / "c", seed=12, workers=1, **SMALL)  # type: ignore[arg-type]
    pc = _pixels(tmp_path / "c")
    big_a = {v for v in pa.values() if len(v) > 100}  # pixel data (paths differ: other patient ids)
    big_c = {v for v in pc.values() if len(v) > 100}
    assert len(big_c) > 40 and not big_a & big_c
    assert (tmp_path / "a" / "labels.csv").read_bytes() != (tmp_path / "c" / "labels.csv").read_bytes()
    assert c["n_images"] == a["n_images"]


def test_regenerating_into_the_same_folder_replaces_the_study(tmp_path):
    generate_study(tmp_path / "s", seed=1, workers=1, **SMALL)  # type: ignore[arg-type]
    first = _pixels(tmp_path / "s")
    generate_study(tmp_path / "s", seed=2, workers=1, **SMALL)  # type: ignore[arg-type]
    second = _pixels(tmp_path / "s")
    assert first != second
    assert not list((tmp_path / "s").rglob("*.part")) and not list((tmp_path / "s").rglob("*.tmp"))
