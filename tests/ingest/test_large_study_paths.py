"""The shortcuts that make a ChestX-ray14-sized ingest fast (benchmarks/bench_nih_scale.py) give what the
plain way gives: the report's JSON, the image store written without a copy, the scan-root walk, the label
table parsed once per distinct cell, and MLflow dataset inputs whose schema is inferred from one row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import DataError
from pipeline.ingest.deid import salted_key
from pipeline.ingest.discover import discover
from pipeline.ingest.labels import load_table
from pipeline.ingest.manifest import LabelsConfig
from pipeline.ingest.store import ImageStore, StoreWriter, atomic_write_json, json_text

PNG = b"\x89PNG\r\n\x1a\n" + bytes(400)


def test_report_json_reads_back_equal_with_one_file_per_line(tmp_path: Path) -> None:
    files = [{"status": "accepted", "file_key": f"{i:016x}", "images": 1} for i in range(3, 0, -1)]
    report = {
        "n_files": 3,
        "reasons": {"unreadable": 2},
        "files": files,
        "paths": {"b": {"path": "x/b.png"}, "a": {"path": "x/a.png"}},
        "empty": [],
        "when": Path("/p"),  # not JSON: written as its text, as json.dumps(default=str) does
    }
    atomic_write_json(tmp_path / "r.json", report)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == json.loads(json.dumps(report, sort_keys=True, default=str))
    lines = text.splitlines()
    # each file entry on its own line, keys sorted everywhere, top-level keys in order
    assert [ln.strip().rstrip(",") for ln in lines if '"file_key"' in ln] == [
        json.dumps(f, sort_keys=True) for f in files
    ]
    top = [ln.split(":")[0].strip() for ln in lines if ln.startswith('  "')]
    assert top == sorted(top) == ['"empty"', '"files"', '"n_files"', '"paths"', '"reasons"', '"when"']
    assert lines.index('    "a": {"path": "x/a.png"},') < lines.index('    "b": {"path": "x/b.png"}')
    assert json_text({1: "a"}) == json.dumps({1: "a"}) and json_text([1, {"b": 2}]) == '[1, {"b": 2}]'


def test_store_images_are_written_once_with_the_final_row_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((k, 1, 4, 5)).astype(np.float16) for k in (2, 1, 3)]
    w = StoreWriter(tmp_path / "store", (1, 4, 5))
    assert [list(w.append(b)) for b in blocks] == [[0, 1], [2], [3, 4, 5]]
    index = pd.DataFrame({"scan_key": [f"k{i}" for i in range(6)], "patient_key": "p", "labels": "a"})
    w.commit(index, {"normal_label": "a"})
    path = tmp_path / "store" / "images.npy"
    images = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(images, np.concatenate(blocks))
    # a 128-byte header and the rows: nothing else, and no temporary file left
    assert path.stat().st_size == 128 + 6 * 20 * 2
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "images.npy",
        "scan_index.parquet",
        "store.json",
    ]
    st = ImageStore.open(tmp_path / "store")
    assert st.images.shape == (6, 1, 4, 5) and st.meta["n_images"] == 6


def test_walk_skips_the_label_table_itself_not_files_of_its_name(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "labels.csv").write_text("Image Index,Finding Labels\n")
    os.symlink(root / "labels.csv", root / "table_link.csv")  # the same file under another name
    (root / "sub" / "labels.csv").write_bytes(PNG)  # another file that happens to share the name
    (root / "sub" / "deeper" / "a.png").write_bytes(PNG)
    (root / "b.png").write_bytes(PNG)
    os.symlink(root / "sub", root / "sub_link")  # a second way into a folder already walked
    found = discover(root, skip={root / "labels.csv"})
    assert [(c.rel, c.fmt) for c in found] == [
        ("b.png", "png"),
        ("sub/deeper/a.png", "png"),
        ("sub/labels.csv", "png"),
    ]
    assert all(c.path == root / c.rel for c in found)
    assert [c.rel for c in discover(root, exclude=["sub/*"], skip={root / "labels.csv"})] == ["b.png"]


def test_label_cells_are_parsed_once_but_every_bad_row_is_named(tmp_path: Path) -> None:
    rows = [
        "Image Index,Finding Labels,Patient ID,Patient Age",
        "a.png,\"['Mass']\",FAKEP1,41",
        "b.png,\"['Mass'\",FAKEP1,43",
        "c.png,\"['Mass']\",FAKEP2,90",
        "d.png,\"['Mass'\",FAKEP2,x",
    ]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    cfg = LabelsConfig.model_validate(
        {"path": str(tmp_path / "l.csv"), "key_column": "Image Index", "label_column": "Finding Labels",
         "format": "list", "patient_column": "Patient ID", "age_column": "Patient Age"}
    )  # fmt: skip
    with pytest.raises(DataError, match=r"2 row\(s\).*data row 2 .*data row 4 "):
        load_table(cfg, b"salt")
    rows[2], rows[4] = "b.png,\"['Nodule', 'Mass']\",FAKEP1,43", "d.png,\"['Mass']\",FAKEP2,x"
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    t = load_table(cfg, b"salt")
    assert {k: r.labels for k, r in t.rows.items()} == {
        "a.png": ["Mass"], "b.png": ["Mass", "Nodule"], "c.png": ["Mass"], "d.png": ["Mass"]
    }  # fmt: skip
    t.rows["a.png"].labels.append("Edema")  # rows parsed from one cell do not share their list
    assert t.rows["c.png"].labels == ["Mass"]
    assert [t.rows[k + ".png"].patient_key for k in "abcd"] == [
        salted_key(b"salt", "patient", p) for p in ("FAKEP1", "FAKEP1", "FAKEP2", "FAKEP2")
    ]
    assert [t.rows[k + ".png"].age_bin for k in "abcd"] == ["40-44", "40-44", "90+", ""]


@pytest.mark.parametrize("mixed", [False, True])
def test_dataset_input_schema_and_profile_equal_mlflows_own(tmp_store: Path, mixed: bool) -> None:
    from mlflow.data.pandas_dataset import from_pandas

    from pipeline import tracking

    df = pd.DataFrame(
        {"scan_key": [f"{i:016x}" for i in range(500)], "labels": ["Mass|Nodule", "No Finding"] * 250,
         "store_index": np.arange(500), "frame": np.full(500, -1)}
    )  # fmt: skip
    if mixed:  # a missing value, Python ints in an object column: MLflow reads the whole table
        df = df.astype({"labels": object})
        df.loc[7, "labels"] = None
        df["n"] = pd.Series(list(range(500)), dtype=object)
    with tracking.stage_run(
        "ingest", run_name="t", config={}, upstream={}, fp="x", suite=None, dataset="d"
    ) as run:
        run.log_dataset(df, name="idx", digest="abc", context="ingest", source="store/scan_index.parquet")
        run_id = run.run_id
    (got,) = tracking.client().get_run(run_id).inputs.dataset_inputs
    want = from_pandas(df, source="x", name="idx", digest="abc").to_dict()
    assert json.loads(got.dataset.schema) == json.loads(want["schema"])
    required = {c["name"]: c["required"] for c in json.loads(want["schema"])["mlflow_colspec"]}
    assert required["labels"] is not mixed  # the case that needs the whole table is covered
    assert json.loads(got.dataset.profile) == {"num_rows": 500, "num_elements": 500 * df.shape[1]}
    assert (got.dataset.name, got.dataset.digest, got.tags[0].value) == ("idx", "abc", "ingest")
    assert "store/scan_index.parquet" in got.dataset.source  # a JSON object holding the URI
