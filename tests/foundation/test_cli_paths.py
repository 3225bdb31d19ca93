"""Paths the user typed come back as typed, and predict never replaces a file silently (issue 17 item 8).

Each command below fails on its input before any run starts (and before torch or mlflow is imported), so
its message may name the path the user gave: it goes to the terminal only, never into MLflow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main, predict_output
from pipeline.errors import ConfigError
from pipeline.suite import REPO_ROOT


def _err(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_a_missing_support_or_query_set_is_named_as_typed_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DOE^JOHN").mkdir()
    err = _err(["adapt", "--model", "m@current", "--support", "DOE^JOHN/support"], capsys)
    assert f"error: --support: DOE^JOHN/support not found (relative paths resolve against {tmp_path})" in err
    err = _err(["adapt", "--model", "m@current", "--support", "DOE^JOHN", "--query", "q/none"], capsys)
    assert "error: --query: q/none not found" in err
    err = _err(["adapt", "--model", "m@current", "--set", "support=s/none"], capsys)
    assert "error: --set support: s/none not found" in err
    # from the suite: the key and the suite file are named
    suite = yaml.safe_load((REPO_ROOT / "tasks" / "demo_quick.yaml").read_text())
    suite["dataset"] = str(REPO_ROOT / "data_manifests" / "demo_quick.yaml")
    suite["adapt"]["support"] = "sets/absent"
    suite.pop("demo_data", None)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    err = _err(["adapt", "s.yaml", "--model", "m@current"], capsys)
    assert "error: adapt.support in s.yaml: sets/absent not found" in err
    err = _err(["run", "s.yaml"], capsys)  # the chain refuses it before ingest starts
    assert "error: adapt.support in s.yaml: sets/absent not found" in err


def test_a_missing_predict_input_is_named_as_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    err = _err(["predict", "--model", "m@current", "--input", "new/scans"], capsys)
    assert "error: --input new/scans not found" in err


def test_predict_output_default_explicit_existing_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # the default is predictions.csv here, shown in full since the user did not type it
    assert predict_output(None, overwrite=False) == tmp_path / "predictions.csv"
    assert predict_output(Path("out/p.csv"), overwrite=False) == Path("out/p.csv")
    (tmp_path / "predictions.csv").write_text("earlier results\n")
    with pytest.raises(ConfigError, match="the default --output .*predictions.csv already exists; give"):
        predict_output(None, overwrite=False)
    assert predict_output(None, overwrite=True) == tmp_path / "predictions.csv"
    with pytest.raises(ConfigError, match=r"^--output predictions.csv already exists; .*--overwrite"):
        predict_output(Path("predictions.csv"), overwrite=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(
        ConfigError, match="--output d is a folder; give a file name such as d/predictions.csv"
    ):
        predict_output(Path("d"), overwrite=True)


def test_predict_refuses_to_replace_results_before_predicting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pipeline.adapt.predict as predict_mod

    calls: list[Path] = []
    monkeypatch.setattr(
        predict_mod, "predict", lambda m, i, out, **kw: calls.append(out) or {"n_scans": 1, "n_predicted": 1}
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scans").mkdir()
    args = ["predict", "--model", "m@current", "--input", "scans"]
    assert main(args) == 0 and calls == [tmp_path / "predictions.csv"]
    (tmp_path / "predictions.csv").write_text("earlier results\n")
    err = _err(args, capsys)
    assert "already exists" in err and "--overwrite" in err and len(calls) == 1
    assert (tmp_path / "predictions.csv").read_text() == "earlier results\n"
    assert main([*args, "--overwrite"]) == 0 and len(calls) == 2


def test_a_predict_input_without_scans_is_named_as_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no scans here")
    err = _err(["predict", "--model", "m@current", "--input", "notes"], capsys)
    assert "error: --input notes: the folder holds no scan files" in err
    assert not (tmp_path / "predictions.csv").exists()
