"""The whole library path: discover -> decode -> labels -> store; report, keys, cache, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import DataError
from pipeline.ingest import build as build_mod
from pipeline.ingest import store as store_mod
from pipeline.ingest.build import build_store
from pipeline.ingest.deid import load_or_create_salt, salted_key
from pipeline.ingest.reading import load_for_model
from pipeline.ingest.store import ImageStore
from tests.ingest.conftest import FAKE_NAME
from tests.ingest.helpers import FAKE_PIDS, FAKE_SUBJECT_DIRS, make_study, manifest


def test_study_ingest_report_index_and_store(tmp_path: Path) -> None:
    make_study(tmp_path / "s")
    s = build_store(manifest(tmp_path / "s"), tmp_path / "out")
    st = ImageStore.open(tmp_path / "out" / "store")
    assert st.images.shape == (12, 1, 16, 16) and st.images.dtype == np.float16
    assert isinstance(st.images, np.memmap)
    assert list(st.index["store_index"]) == list(range(12))
    assert st.index["patient_key"].nunique() == len(FAKE_PIDS)
    assert sorted(st.index["labels"].unique()) == ["Effusion|Mass", "Mass", "No Finding", "Nodule"]
    assert st.meta["label_names"] == ["Effusion", "Mass", "No Finding", "Nodule"]
    assert (
        st.meta["normal_label"] == "No Finding" and st.meta["spatial_dims"] == 2 and st.meta["channels"] == 1
    )
    assert set(st.index["age_bin"]) <= {"40-44", "45-49", "50-54"} and set(st.index["sex"]) == {"M", "F"}
    assert set(st.index["voi_rule"]) == {"header_window", "header_window+inverted"}
    # every file accounted for; each reason counted
    rep = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert rep["n_files"] == 14 and rep["n_accepted_files"] == 12
    assert rep["reasons"] == {"label_for_missing_file": 1, "unreadable": 2}
    assert s.reasons == rep["reasons"] and "unreadable 2" in s.line()
    assert len(rep["label_rows_without_file"]) == 1
    # rows_for maps keys back to rows
    keys = list(st.index["scan_key"][[3, 7]])
    assert list(st.rows_for(keys)) == [3, 7]
    with pytest.raises(DataError):
        st.rows_for(["0000000000000000"])


def test_nothing_written_holds_phi(tmp_path: Path) -> None:
    make_study(tmp_path / "s")
    build_store(manifest(tmp_path / "s"), tmp_path / "out")
    blobs = b"".join(
        p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file() and p.suffix != ".npy"
    )
    for phi in [
        *FAKE_PIDS,
        *FAKE_SUBJECT_DIRS,
        FAKE_NAME,
        "Fakename",
        "FAKEACC42",
        "Fake General Hospital",
        "19000101",
        "00000003_000",
    ]:
        assert phi.encode() not in blobs, phi
    # no original DICOM UID either (pydicom's generated root)
    assert b"1.2.826.0.1.3680043" not in blobs


def test_reingest_gives_identical_keys_and_reuses_decodes(tmp_path: Path) -> None:
    make_study(tmp_path / "s")
    cfg = manifest(tmp_path / "s")
    a = build_store(cfg, tmp_path / "a")
    b = build_store(cfg, tmp_path / "b")
    assert a.cached == 0 and b.cached == 12
    pd.testing.assert_frame_equal(a.index, b.index)
    assert a.digest == b.digest
    ia, ib = (np.load(tmp_path / d / "store" / "images.npy") for d in "ab")
    np.testing.assert_array_equal(ia, ib)
    c = build_store(manifest(tmp_path / "s", preprocess={"image_size": [8, 8]}), tmp_path / "c")
    assert c.cached == 0  # other preprocessing: nothing reused
    assert list(c.index["scan_key"]) == list(a.index["scan_key"])


def test_interrupted_ingest_leaves_previous_store_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_study(tmp_path / "s")
    cfg = manifest(tmp_path / "s", cache_dir=None)
    build_store(cfg, tmp_path / "out")
    store = tmp_path / "out" / "store"
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    calls = {"n": 0}
    real = store_mod.StoreWriter.append

    def append_then_die(self, block):  # Ctrl-C in the middle of the decode loop
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, block)

    monkeypatch.setattr(store_mod.StoreWriter, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_store(
            manifest(tmp_path / "s", cache_dir=None, preprocess={"image_size": [8, 8]}), tmp_path / "out"
        )
    after = {p.name: p.read_bytes() for p in store.iterdir()}
    assert after == before  # same files, same bytes, no temporary leftovers
    assert ImageStore.open(store).images.shape[2:] == (16, 16)


def test_inconsistent_store_is_refused(tmp_path: Path) -> None:
    make_study(tmp_path / "s")
    build_store(manifest(tmp_path / "s"), tmp_path / "out")
    store = tmp_path / "out" / "store"
    np.save(store / "images.npy", np.zeros((3, 1, 16, 16), np.float16))
    with pytest.raises(DataError, match="inconsistent"):
        ImageStore.open(store)


def test_nothing_usable_raises_with_reasons_and_keeps_report(tmp_path: Path) -> None:
    make_study(tmp_path / "s")
    # joins on nothing (no patient column: two rows of one age would be two patients for one key)
    cfg = manifest(tmp_path / "s", labels={"key_column": "Patient Age", "patient_column": None})
    with pytest.raises(DataError, match="nothing usable.*no_label 12"):
        build_store(cfg, tmp_path / "out")
    rep = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert (
        rep["reasons"]["no_label"] == 12 and rep["reasons"]["label_for_missing_file"] == 12
    )  # 13 rows, 12 distinct ages
    assert not (tmp_path / "out" / "store" / "images.npy").exists()


def test_duplicate_sop_instance_is_rejected(tmp_path: Path) -> None:
    files = make_study(tmp_path / "s")["files"]
    dup = tmp_path / "s" / "dicom" / "zz_copy" / files[2].name
    dup.parent.mkdir()
    dup.write_bytes(files[2].read_bytes())
    s = build_store(manifest(tmp_path / "s"), tmp_path / "out")
    assert s.reasons.get("duplicate_sop_instance") == 1 and s.n_images == 12


def test_load_for_model_reproduces_the_stored_array(tmp_path: Path) -> None:
    files = make_study(tmp_path / "s")["files"]
    build_store(manifest(tmp_path / "s"), tmp_path / "out")
    st = ImageStore.open(tmp_path / "out" / "store")
    salt = load_or_create_salt(Path(".fewscan/salt"))
    for i in (0, 1, 5):  # MONOCHROME1, RLE, plain
        x = load_for_model(files[i], st.meta["preprocessing"])
        assert x.dtype == np.float32 and x.shape == (1, 16, 16)
        rel = files[i].relative_to(tmp_path / "s" / "dicom").as_posix()
        (row,) = np.flatnonzero(st.index["file_key"] == salted_key(salt, "file", rel))
        np.testing.assert_array_equal(x, st.images[row].astype(np.float32))
        assert x.std() > 0.1  # a real image, not the zero padding
    with pytest.raises(DataError, match="unreadable"):
        load_for_model(tmp_path / "s" / "dicom" / "junk" / "truncated.dcm", st.meta["preprocessing"])
    with pytest.raises(DataError, match="unreadable"):
        load_for_model(tmp_path / "s" / "dicom" / "junk" / "readme.txt", st.meta["preprocessing"])


def test_parallel_decode_equals_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_study(tmp_path / "s")
    serial = build_store(manifest(tmp_path / "s", cache_dir=None), tmp_path / "a")
    monkeypatch.setattr(build_mod, "MIN_PARALLEL_TASKS", 0)
    par = build_store(manifest(tmp_path / "s", cache_dir=None, workers=2), tmp_path / "b")
    pd.testing.assert_frame_equal(serial.index, par.index)
    np.testing.assert_array_equal(
        np.load(tmp_path / "a/store/images.npy"), np.load(tmp_path / "b/store/images.npy")
    )


KILL_CHILD = """
import sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}]
from pipeline.ingest import store as store_mod
from pipeline.ingest.build import build_store
from tests.ingest.helpers import manifest
real = store_mod.StoreWriter.append
calls = []
def slow_append(self, block):
    calls.append(1)
    if len(calls) == 3:
        Path({marker!r}).write_text("mid-write")
        time.sleep(60)
    return real(self, block)
store_mod.StoreWriter.append = slow_append
build_store(manifest(Path({study!r}), cache_dir=None, preprocess={{"image_size": [8, 8]}}), Path({out!r}))
"""


def test_killed_ingest_leaves_previous_store_intact(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    make_study(tmp_path / "s")
    build_store(manifest(tmp_path / "s", cache_dir=None), tmp_path / "out")
    store = tmp_path / "out" / "store"
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    marker = tmp_path / "marker"
    repo = str(Path(__file__).resolve().parents[2])
    code = KILL_CHILD.format(
        repo=repo, marker=str(marker), study=str(tmp_path / "s"), out=str(tmp_path / "out")
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the child ingest ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)  # no cleanup handlers run
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert any(p.name.startswith(".images.raw.tmp-") for p in store.iterdir())  # killed mid-write
    kept = {p.name: p.read_bytes() for p in store.iterdir() if not p.name.startswith(".")}
    assert kept == before
    assert ImageStore.open(store).images.shape == (12, 1, 16, 16)
    build_store(manifest(tmp_path / "s", cache_dir=None), tmp_path / "out")  # next ingest sweeps leftovers
    assert not [p for p in store.iterdir() if p.name.startswith(".")]
