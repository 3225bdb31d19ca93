"""End to end: `fewscan demo --quick` from the command line, as a new user runs it.

One quick demo is shared by the tests of this module (it takes a couple of minutes on 2 CPU cores).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

pytestmark = pytest.mark.e2e

STAGES = ("ingest", "episodes", "meta-train", "adapt", "evaluate")
UPSTREAM = {"episodes": "ingest", "meta-train": "episodes", "adapt": "meta-train", "evaluate": "meta-train"}


def _fewscan(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("demo")
    res = _fewscan(["demo", "--quick"], d)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    (d / "first_stdout.txt").write_text(res.stdout)
    (d / "first_stderr.txt").write_text(res.stderr)
    return d


def _client(d: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{d / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _stage_runs(d: Path) -> dict[str, list]:
    c = _client(d)
    exps = [e.experiment_id for e in c.search_experiments()]
    out: dict[str, list] = {}
    for s in STAGES:
        out[s] = c.search_runs(exps, f"tags.`fewscan.stage` = '{s}'", order_by=["attributes.start_time ASC"])
    return out


def test_quick_demo_leaves_five_linked_finished_runs(demo_dir: Path) -> None:
    runs = _stage_runs(demo_dir)
    assert {s: len(r) for s, r in runs.items()} == {s: 1 for s in STAGES}
    ids = {s: r[0].info.run_id for s, r in runs.items()}
    for s, (run,) in runs.items():
        assert run.info.status == "FINISHED", (s, run.data.tags.get("fewscan.error"))
        assert run.data.tags["fewscan.fingerprint"]
        if s in UPSTREAM:
            assert run.data.tags[f"fewscan.upstream.{UPSTREAM[s]}"] == ids[UPSTREAM[s]]
    out = (demo_dir / "first_stdout.txt").read_text()
    assert "report:" in out and "fewscan ui" in out
    # the evaluation's report exists where the demo says
    report = next(line.split("report:", 1)[1].strip() for line in out.splitlines() if "report:" in line)
    text = Path(report).read_text()
    assert "## Verdict" in text
    for method in ("maml", "protonet", "finetune", "scratch"):
        assert f"| {method} |" in text, method
    # the demo ends with what was learned: one row per method and the chance level
    table = out[out.index("What was learned") :].splitlines()
    assert [row.split()[0] for row in table[2:7]].count("chance") == 1
    assert {row.split()[0] for row in table[2:6]} == {"maml", "protonet", "finetune", "scratch"}


def test_the_quick_demo_prints_nothing_but_fewscan_lines(demo_dir: Path) -> None:
    """Issue 17 item 2: a stage prints fewscan's progress lines and its summary, nothing else — no Python
    warning (MLflow's dataset-source ambiguity, pickling, type hints; pydicom's UIDs), no MLflow INFO log,
    no "Downloading artifacts" bar (docs/ARCHITECTURE.md, principle 11)."""
    err = (demo_dir / "first_stderr.txt").read_text()
    foreign = [line for line in err.splitlines() if line.strip() and not line.startswith("[fewscan] ")]
    assert not foreign, "\n".join(foreign[:20])
    assert "Warning" not in err and "Downloading artifacts" not in err


def test_the_demo_adapted_model_does_not_call_every_query_scan_one_class(demo_dir: Path) -> None:
    """Issue 17 item 7: the demo's adapted Hernia model called all its query scans 'No Finding' (argmax of a
    barely moved model). With the threshold chosen on its support scans it names the condition for some
    query scans; the summary leads with balanced accuracy, sensitivity and specificity. (The quick demo's
    meta-model is too weak for these numbers to mean much; tests/adapt/test_stage.py shows the mechanism on
    a model whose ranking is right.)"""
    (run,) = _stage_runs(demo_dir)["adapt"][:1]
    m = run.data.metrics
    assert m["query_sensitivity"] > 0 and m["query_predicted_one_class"] == 0
    assert 0 < m["threshold"] < 1 and "support_cv_balanced_accuracy" in m
    out = (demo_dir / "first_stdout.txt").read_text()
    line = next(x for x in out.splitlines() if x.startswith("adapt finished"))
    assert ": adapted maml to 'Hernia': query balanced acc " in line and ", sensitivity " in line


def test_rerun_reuses_all_and_a_change_reruns_downstream_only(demo_dir: Path) -> None:
    before = {s: r[0].info.run_id for s, r in _stage_runs(demo_dir).items()}
    res = _fewscan(["run", "demo_quick"], demo_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("reusing finished run") == 5
    after = _stage_runs(demo_dir)
    assert {s: len(r) for s, r in after.items()} == {s: 1 for s in STAGES}

    res = _fewscan(["run", "demo_quick", "--set", "evaluate.seeds=[1]"], demo_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("reusing finished run") == 4
    after = _stage_runs(demo_dir)
    assert [r.info.run_id for r in after["ingest"]] == [before["ingest"]]
    assert [r.info.run_id for r in after["meta-train"]] == [before["meta-train"]]
    assert len(after["evaluate"]) == 2
    new_eval = after["evaluate"][-1]
    assert new_eval.info.status == "FINISHED"
    assert new_eval.data.tags["fewscan.upstream.meta-train"] == before["meta-train"]


def _phi_values(demo_dir: Path) -> set[str]:
    """Identifying header values of the demo DICOM files (fake, but treated as real PHI)."""
    values: set[str] = set()
    files = [p for p in (demo_dir / "demo_data").rglob("*") if p.is_file()]
    n = 0
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - junk files in the demo tree
            continue
        for tag in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "InstitutionName",
            "ReferringPhysicianName",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
        ):
            v = str(ds.get(tag, "") or "")
            if len(v) >= 6:
                values.add(v)
                if tag == "PatientName":
                    values.update(part for part in v.split("^") if len(part) >= 6)
        n += 1
        if n >= 400:
            break
    assert n > 50 and len(values) > 100
    return values


def test_no_phi_reaches_mlflow(demo_dir: Path) -> None:
    phi = _phi_values(demo_dir)
    # everything in the tracking database: params, tags, metric keys, run names, dataset inputs
    con = sqlite3.connect(demo_dir / "mlflow" / "mlflow.db")
    blobs: list[bytes] = []
    for (table,) in con.execute("select name from sqlite_master where type='table'"):
        for row in con.execute(f'select * from "{table}"'):
            blobs.append(" ".join(str(v) for v in row).encode())
    con.close()
    # and every artifact byte
    for p in (demo_dir / "mlflow" / "artifacts").rglob("*"):
        if p.is_file():
            blobs.append(p.read_bytes())
    leaks = sorted({v for v in phi for b in blobs if v.encode() in b})
    assert leaks == []
