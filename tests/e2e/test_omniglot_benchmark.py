"""Smoke version of the Omniglot benchmark (benchmarks/omniglot/run.py, issue 15): the script unpacks a
few characters per alphabet from the two zips into PNGs + labels.csv + a data manifest + a suite, and the
whole chain runs on them at a tiny budget, with episodes within one alphabet (labels.group_columns ->
episodes.group_by). The real benchmark and its numbers: benchmarks/RESULTS.md, "Omniglot".

About 20-40 s on 2 CPU cores (ingest of 800 PNGs and the evaluate stage dominate): marked e2e.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from pipeline import tracking

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "omniglot" / "run.py"


def _module():
    spec = importlib.util.spec_from_file_location("omniglot_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.e2e
def test_omniglot_smoke_prepares_the_files_and_runs_the_chain(tmp_store: Path) -> None:
    mod = _module()
    if not all((mod.DEFAULT_SOURCE / z).is_file() for z in mod.ZIPS):
        pytest.skip(f"Omniglot zips not at {mod.DEFAULT_SOURCE}")
    (suite,) = mod.prepare(tmp_store, budget="smoke", ways=(5,), within_alphabet=True, per_alphabet=5)

    with (tmp_store / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    # 8 alphabets x 5 characters x 20 drawings: Greek and Latin, in both zips, written once
    assert len(rows) == 800 and len({r["file"] for r in rows}) == 800
    assert len(list((tmp_store / "png").rglob("*.png"))) == 800
    assert {r["alphabet"] for r in rows} >= {"Greek", "Latin", "Korean", "Tagalog"}
    suite_cfg = yaml.safe_load(suite.read_text())
    assert suite_cfg["episodes"]["group_by"] == "alphabet" and suite_cfg["episodes"]["kinds"] == ["n_way"]
    assert all(c.startswith(("Korean/", "Sanskrit/")) for c in suite_cfg["episodes"]["split"]["rare"])
    assert "Patients. Omniglot has none" in suite.read_text()  # the patient-column choice, explained

    (summary,) = mod.run([suite], tmp_store, [], force=False)
    assert set(summary["walls"]) == {"ingest", "episodes", "meta-train", "evaluate"}
    assert {k.split()[-1] for k in summary["methods"]} == {"maml", "protonet", "finetune", "scratch"}
    assert all(0.0 <= m["mean"] <= 1.0 for m in summary["methods"].values())

    runs = tracking.client().search_runs(
        [e.experiment_id for e in tracking.client().search_experiments()], "tags.`fewscan.stage` = 'episodes'"
    )
    split = tracking.UpstreamRun.from_id(runs[0].info.run_id).read_json("split.json")
    test_eps = tracking.UpstreamRun.from_id(runs[0].info.run_id).artifact("episodes/test.jsonl")
    for line in test_eps.read_text().splitlines():
        classes = json.loads(line)["classes"]
        assert len(classes) == 5 and len({c.split("/")[0] for c in classes}) == 1  # one alphabet
    assert split["group_by"] == "alphabet" and split["conditions"]["Korean/character01"]["split"] == "test"
