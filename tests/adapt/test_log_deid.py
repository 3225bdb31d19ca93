"""stderr of adapt/predict never shows a path: files are named by their salted file key, and the local-only
report next to the salt maps the key back to the clear path. The folder names below are fake (no PHI)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from pipeline.adapt.adapted import AdaptedClassifier
from pipeline.adapt.ledger import PathLedger
from pipeline.adapt.listing import list_labelled
from pipeline.adapt.scan_spec import ScanSpec
from pipeline.adapt.support import load_labelled
from pipeline.errors import ConfigError, DataError
from pipeline.ingest.deid import salted_key
from pipeline.meta.model_io import load_meta_model
from tests.adapt import helpers as h

SALT = b"0" * 64
NAME = "DOE^JOHN"  # what a folder named after a patient looks like
CLASSES = [h.CONDITION, h.NORMAL]


def _spec() -> ScanSpec:
    return ScanSpec(preprocessing=h.preprocessing(), shape=(1, h.SIZE, h.SIZE), modalities=frozenset({"DX"}))


def _mapped(report: Path) -> dict[str, str]:
    return {k: v["path"] for k, v in json.loads(report.read_text())["files"].items()}


def test_support_logs_name_files_by_salted_key_and_the_local_report_maps_them_back(
    sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = shutil.copytree(sets["support"], tmp_path / NAME / "support")
    bad = d / h.CONDITION / f"{NAME}_broken.dcm"
    bad.write_bytes(b"DICM but not really" * 10)
    dup = d / h.CONDITION / f"z_{NAME}_again.dcm"  # sorts after the original: the one left out
    shutil.copy(d / h.CONDITION / "scan_000.dcm", dup)
    loose = d / f"{NAME}.dcm"
    shutil.copy(d / h.NORMAL / "scan_000.dcm", loose)
    report = tmp_path / "reports" / "adapt.paths.json"
    ledger = PathLedger(SALT, report)

    s = load_labelled(list_labelled(d, "support", ledger), CLASSES, _spec(), SALT, ledger=ledger)
    assert s.counts() == {h.CONDITION: 5, h.NORMAL: 5} and len(s.rejected) == 1
    assert len(set(s.keys)) == 10  # the scans' content keys, untouched by the logging

    err = capsys.readouterr().err
    assert "DOE" not in err and "JOHN" not in err and str(tmp_path / NAME) not in err
    key = {p: salted_key(SALT, "file", str(p.resolve())) for p in (bad, dup, loose)}
    assert f"skipped unreadable scan, file {key[bad]}" in err
    assert f"file {key[dup]}" in err and "duplicate" in err
    assert f"file {key[loose]}" in err and "ignoring 1 file(s)" in err
    assert f"clear path in {report}" in err
    mapped = _mapped(report)
    assert {mapped[key[p]] for p in (bad, dup, loose)} == {str(p.resolve()) for p in (bad, dup, loose)}
    # written atomically: no temp file left next to it
    assert [p.name for p in report.parent.iterdir()] == ["adapt.paths.json"]


def test_refusals_keep_the_path_out_of_the_error_and_stderr_but_in_the_local_report(
    sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "reports" / "adapt.paths.json"
    ledger = PathLedger(SALT, report)
    missing = tmp_path / NAME / "support"
    with pytest.raises(ConfigError, match="support set not found") as info:
        list_labelled(missing, "support", ledger)
    assert "DOE" not in str(info.value)
    d = shutil.copytree(sets["support"], tmp_path / "sets" / NAME)
    shutil.copy(d / h.CONDITION / "scan_000.dcm", d / h.NORMAL / "copy.dcm")
    with pytest.raises(DataError, match="same scan appears in support classes") as info:
        load_labelled(list_labelled(d, "support", ledger), CLASSES, _spec(), SALT, ledger=ledger)
    assert "DOE" not in str(info.value)

    err = capsys.readouterr().err
    assert "DOE" not in err and "sets/" not in err
    k_missing = salted_key(SALT, "file", str(missing.resolve()))
    k_copy = salted_key(SALT, "file", str((d / h.NORMAL / "copy.dcm").resolve()))
    assert "support set not found" in err and k_missing in err and k_copy in err
    mapped = _mapped(report)  # both refusals merged into one report, each key back to its path
    assert mapped[k_missing] == str(missing.resolve())
    assert mapped[k_copy] == str((d / h.NORMAL / "copy.dcm").resolve())


@pytest.fixture
def served(meta_model_dir: Path, sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> AdaptedClassifier:
    """An adapted classifier that `pipeline.serving.load_adapted` returns for any model URI."""
    import pipeline.serving

    mm = load_meta_model(meta_model_dir)
    s = load_labelled(list_labelled(sets["support"]), CLASSES, _spec(), SALT)
    method = mm.method()
    clf = AdaptedClassifier(mm, method, method.fit(s.x, s.y, 2), CLASSES, _spec(), {})
    monkeypatch.setattr(pipeline.serving, "load_adapted", lambda uri: clf)
    return clf


def test_predict_stderr_names_no_data_path_while_the_csv_keeps_them(
    served: AdaptedClassifier, sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.adapt.predict import predict

    inp = tmp_path / NAME / "new"
    shutil.copytree(sets["query"] / h.CONDITION, inp)
    (inp / f"{NAME}_junk.dcm").write_bytes(b"not a scan at all" * 30)
    out = tmp_path / NAME / "preds.csv"
    salt_file = tmp_path / "salt"
    salt_file.write_text("a" * 64 + "\n")
    reports = tmp_path / "reports"
    summary = predict("models:/x@latest", inp, out, salt_file=salt_file, local_report_dir=reports)
    assert summary["n_errors"] == 1 and summary["n_scans"] == 16

    err = capsys.readouterr().err
    # the --output the user typed is shown as typed; the files found under --input are named by key only
    assert f"written to {out} in " in err
    assert "_junk.dcm" not in err and str(inp) not in err
    # the CSV is the user's own local result: its rows keep the clear paths
    rows = list(csv.DictReader(out.open()))
    assert any(r["path"].endswith(f"{NAME}_junk.dcm") and r["error"] for r in rows)

    with pytest.raises(ConfigError, match="input not found") as info:
        predict("models:/x@latest", inp / "nope", out, salt_file=salt_file, local_report_dir=reports)
    assert "DOE" not in str(info.value)
    err = capsys.readouterr().err
    assert "DOE" not in err
    k_nope = salted_key(("a" * 64).encode(), "file", str((inp / "nope").resolve()))
    assert k_nope in err and _mapped(reports / "predict.paths.json")[k_nope] == str((inp / "nope").resolve())


def test_predict_command_passes_salt_file_report_dir_and_threads(
    served: AdaptedClassifier, sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fewscan predict --salt-file --local-report-dir` uses that salt and writes the key map there."""
    from pipeline.cli import main

    inp = tmp_path / NAME
    shutil.copytree(sets["query"] / h.CONDITION, inp)
    salt_file, reports, out = tmp_path / "s", tmp_path / "rep", tmp_path / "p.csv"
    salt_file.write_text("b" * 64 + "\n")
    args = ["predict", "--model", "models:/x@current", "--input", str(inp), "--output", str(out)]
    assert (
        main([*args, "--salt-file", str(salt_file), "--local-report-dir", str(reports), "--threads", "1"])
        == 0
    )
    assert len(list(csv.DictReader(out.open()))) == 15
    err = capsys.readouterr().err
    assert NAME not in err and f"written to {out}" in err  # the --output as typed, no path from the data
    # a folder of no scans is refused; its path is recorded under the salt's key in --local-report-dir
    notes = tmp_path / NAME / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("no scans here")
    opts = ["--salt-file", str(salt_file), "--local-report-dir", str(reports), "--overwrite"]
    assert main([*args[:-4], "--input", str(notes), "--output", str(out), *opts]) == 2
    k_notes = salted_key(("b" * 64).encode(), "file", str(notes.resolve()))
    assert _mapped(reports / "predict.paths.json")[k_notes] == str(notes.resolve())
    assert main([*args, "--threads", "0"]) == 2  # a clear configuration error, not a crash
    assert "--threads must be >= 1" in capsys.readouterr().err
