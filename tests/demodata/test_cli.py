"""`fewscan make-demo-data` options map onto generate_study and the command ends with one summary line."""

from __future__ import annotations

import argparse

from pipeline.demodata import cli


def test_cli_writes_a_study_and_prints_one_summary_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "s"), "--images", "30", "--size", "32", "--seed", "4",
                              "--workers", "1", "--min-per-finding", "1", "--patients", "20"])  # fmt: skip
    assert cli.run(args) == 0
    out_lines = capsys.readouterr().out.strip().splitlines()
    assert len(out_lines) == 1 and out_lines[0].startswith("demo study: 30 images")
    assert "20 patients" in out_lines[0]
    assert (tmp_path / "s" / "labels.csv").is_file() and (tmp_path / "s" / "study.json").is_file()


def test_cli_defaults_and_choices():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.images, args.size, args.seed, args.modality, args.workers, args.patients) == (
        3000, 256, 0, "DX", None, None)  # fmt: skip
    try:
        parser.parse_args(["--modality", "MR"])
    except SystemExit as e:
        assert e.code == 2
    else:  # pragma: no cover
        raise AssertionError("--modality MR was accepted")
