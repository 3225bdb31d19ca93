"""pipeline/ingest/reading.py: the one grouping of DICOM slices into series (ingest and adapt/predict)."""

from __future__ import annotations

import pytest

from pipeline.ingest import reasons as R
from pipeline.ingest.reading import DicomHeader, group_series
from pipeline.ingest.worker import TaskResult


def _slice(series: str, sop: str) -> DicomHeader:
    return DicomHeader(ok=True, series_key=series, sop_key=sop)


def test_slices_group_by_series_in_order_of_first_appearance() -> None:
    files = ["nifti", "a1", "b1", "a2", "a1-copy", "mf", "bad", "loose", "b2", "c1"]
    heads = [
        None,  # not DICOM: a scan alone
        _slice("A", "1"),
        _slice("B", "1"),
        _slice("A", "2"),
        _slice("A", "1"),  # same SOPInstanceUID again in series A: left out, the first kept
        DicomHeader(ok=True, series_key="M", sop_key="9", frames=12),  # multi-frame: alone
        DicomHeader(ok=False, reason=R.UNREADABLE, detail="truncated"),
        _slice("", "7"),  # a slice without SeriesInstanceUID
        _slice("B", "2"),
        _slice("C", "1"),  # a series of one slice is still a series unit
    ]
    g = group_series(files, heads)
    assert [(u.files, u.series_key, u.position) for u in g.units] == [
        (["nifti"], "", 0),
        (["a1", "a2"], "A", 1),
        (["b1", "b2"], "B", 2),
        (["mf"], "", 5),
        (["c1"], "C", 9),
    ]
    assert g.duplicates == [("a1-copy", "a1")]
    assert [(p, f, h.reason) for p, f, h in g.unreadable] == [(6, "bad", R.UNREADABLE)]
    assert g.no_series == [(7, "loose")]


def test_a_group_function_splits_a_series_listed_under_two_labels() -> None:
    files = [("x", "Mass"), ("y", "Normal"), ("z", "Mass")]
    heads = [_slice("A", "1"), _slice("A", "2"), _slice("A", "3")]
    g = group_series(files, heads, group=lambda f: f[1])
    assert [[n for n, _ in u.files] for u in g.units] == [["x", "z"], ["y"]]


def test_headers_come_from_worker_results_and_must_match_the_files() -> None:
    ok = TaskResult(ok=True, items=[{"series_key": "S", "sop_key": "P", "frames": 1}], warnings={"w": 2})
    assert DicomHeader.from_result(ok) == DicomHeader(
        ok=True, series_key="S", sop_key="P", frames=1, warnings={"w": 2}
    )
    bad = DicomHeader.from_result(TaskResult.rejected(R.DICOMDIR, "a DICOMDIR"))
    assert not bad.ok and bad.reason == R.DICOMDIR
    with pytest.raises(ValueError, match="2 files but 1 headers"):
        group_series(["a", "b"], [None])


def test_a_cut_short_cache_write_is_found_by_the_pruner(tmp_path) -> None:
    # the decode cache is written through pipeline/atomic.py; a write killed mid-way leaves its temp file,
    # which `fewscan gc --cache` must still recognise (pipeline/ingest/cache_prune.py)
    import os

    from pipeline.atomic import atomic_open
    from pipeline.ingest.cache_prune import entries

    entry = tmp_path / "ab" / ("ab" + "0" * 38 + ".fsc")
    with pytest.raises(KeyboardInterrupt), atomic_open(entry, "wb", durable=False) as f:
        f.write(b"half")
        (temp,) = entry.parent.iterdir()  # the temp file beside the entry
        os.link(temp, tmp_path / "kept")  # what a SIGKILL would leave behind
        raise KeyboardInterrupt
    os.rename(tmp_path / "kept", temp)
    assert [e.path.name for e in entries(tmp_path)] == [temp.name]
