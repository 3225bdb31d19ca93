"""The synthetic study carries its own public salt, so the demo's split (and numbers) is the same everywhere.

Real data keeps a random secret salt per installation; the demo's patients are invented, and a salt that
changed with every working folder gave every fresh checkout another split than the README's.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.demodata.generate import DEMO_SALT_FILE, demo_salt, write_demo_salt
from pipeline.ingest.build import build_store
from pipeline.ingest.deid import load_or_create_salt
from pipeline.ingest.manifest import load_manifest
from pipeline.suite import load_suite

REPO = Path(__file__).resolve().parents[2]

# The demo study has truncated DICOMs on purpose; pydicom warns when ingest reads one.
pytestmark = pytest.mark.filterwarnings("ignore:End of file reached")


def test_generator_writes_a_salt_derived_from_its_seed(tiny_study, tmp_path):
    out, summary = tiny_study
    salt_file = out / DEMO_SALT_FILE
    assert salt_file.read_text() == demo_salt(summary["seed"]) + "\n"
    assert load_or_create_salt(salt_file) == demo_salt(summary["seed"]).encode()
    assert demo_salt(3) == demo_salt(3) and demo_salt(3) != demo_salt(4) and len(demo_salt(0)) == 64
    # a folder generated before the study had a salt (or with a damaged one) is repaired in place
    d = tmp_path / "old"
    d.mkdir()
    (d / DEMO_SALT_FILE).write_text("f" * 64 + "\n")
    assert write_demo_salt(d, 7).read_text() == demo_salt(7) + "\n"
    assert not (d / "salt.part").exists()


@pytest.mark.parametrize("name", ["demo", "demo_quick"])
def test_demo_manifest_and_suite_use_the_studys_salt(name):
    suite = load_suite(str(REPO / "tasks" / f"{name}.yaml"))
    out = Path(suite.cfg.demo_data["out"])
    cfg = load_manifest(REPO / "data_manifests" / f"{name}.yaml")
    assert cfg.salt_file == out / DEMO_SALT_FILE
    assert Path(suite.cfg.adapt["salt_file"]) == out / DEMO_SALT_FILE  # adapt keys must match ingest's


def test_two_working_folders_give_the_same_keys_only_with_the_studys_salt(tiny_study, tmp_path, monkeypatch):
    out, _ = tiny_study
    common = [
        f"scans.root={out / 'dicom'}",
        f"labels.path={out / 'labels.csv'}",
        "cache_dir=null",
        "workers=1",
    ]

    def keys(folder: str, salt: list[str]) -> pd.DataFrame:
        wd = tmp_path / folder
        wd.mkdir()
        monkeypatch.chdir(wd)  # each checkout has its own .fewscan/
        cfg = load_manifest(REPO / "data_manifests" / "demo.yaml", [*common, *salt])
        build_store(cfg, wd / "run")
        idx = pd.read_parquet(wd / "run" / "store" / "scan_index.parquet")
        return idx[["scan_key", "patient_key"]].sort_values("scan_key").reset_index(drop=True)

    shared = [f"salt_file={out / DEMO_SALT_FILE}"]
    a, b = keys("a", shared), keys("b", shared)
    assert len(a) > 40 and a.equals(b)
    # the default (a random secret salt per folder) gives other keys, hence another patient order
    c = keys("c", ["salt_file=.fewscan/salt"])
    assert set(c["patient_key"]).isdisjoint(set(a["patient_key"]))
