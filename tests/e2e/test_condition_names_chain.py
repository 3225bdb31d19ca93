"""The whole chain (ingest -> episodes -> meta-train -> adapt -> evaluate) on condition names full of
punctuation, spaces, unicode and case-only differences (issue 14): every stage finishes, every metric
and param key is one MLflow accepts, and colliding names keep distinct keys with a clear warning.

Tiny on purpose (8x8 PNGs, a few meta-training steps): about 20 s on 2 CPU cores, so it is not marked
`e2e` and runs with the fast tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import tracking
from pipeline.chain import run_chain
from pipeline.names import adapted_model_name, is_valid_key

NORMAL = "No Finding"
COMMON = ["Effusion (left)", "Kerley-B lines", "Mass", "mass"]  # "Mass"/"mass": case only
VALIDATION = ["Ödem", "Zyste?"]
RARE = ["Pleural effusion/thickening", "肺炎 (viral)"]
PER_CONDITION = 5  # patients (one scan each) per condition
NORMALS = 24


def _study(root: Path) -> None:
    rng = np.random.default_rng(0)
    conds = COMMON + VALIDATION + RARE
    pattern = {c: rng.integers(0, 2, (8, 8)).astype(bool) for c in conds}
    rows = ["Image Index,Finding Labels,Patient ID"]
    labels = [c for c in conds for _ in range(PER_CONDITION)] + [NORMAL] * NORMALS
    (root / "png").mkdir(parents=True)
    for i, lab in enumerate(labels):
        img = rng.integers(0, 100, (8, 8)).astype(np.uint8)
        if lab != NORMAL:
            img[pattern[lab]] += 120
        Image.fromarray(img).save(root / "png" / f"img{i:03d}.png")
        rows.append(f'img{i:03d}.png,"{lab}",SYNP{i:04d}')  # quoted: names may hold commas one day
    (root / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    # adapt's support/query sets: `path,label` CSVs over fresh scans (names with '/' cannot be folders)
    for part, n in (("support", 2), ("query", 3)):
        d = root / part
        d.mkdir()
        lines = ["path,label"]
        for j in range(2 * n):
            lab = RARE[0] if j % 2 else NORMAL
            img = rng.integers(0, 100, (8, 8)).astype(np.uint8)
            if lab != NORMAL:
                img[pattern[lab]] += 120
            Image.fromarray(img).save(d / f"s{j}.png")
            lines.append(f'{d / f"s{j}.png"},"{lab}"')
        (d / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _suite(root: Path) -> Path:
    manifest = {
        "name": "odd_names",
        "scans": {"root": str(root / "png"), "formats": ["png"]},
        "labels": {"path": str(root / "labels.csv"), "key_column": "Image Index",
                   "label_column": "Finding Labels", "patient_column": "Patient ID", "normal_label": NORMAL},
        "preprocess": {"image_size": [8, 8]},
        "workers": 1,
    }  # fmt: skip
    (root / "odd_names.yaml").write_text(yaml.safe_dump(manifest, allow_unicode=True), encoding="utf-8")
    suite = {
        "name": "odd_names",
        "dataset": str(root / "odd_names.yaml"),
        "episodes": {
            "split": {"common": COMMON, "validation": VALIDATION, "rare": RARE},
            "kinds": ["binary", "n_way"], "n_way": 2, "k_shot": [1], "q_query": 2,
            "val_episodes": 2, "test_episodes": 4, "seed": 0,
            "normal_fraction": {"train": 0.5, "val": 0.25, "test": 0.25},
        },
        "meta_train": {
            "methods": ["maml", "protonet"], "model": {"backbone": "conv4", "filters": 8, "blocks": 2, "norm": "group", "norm_groups": 4},
            "inner": {"steps": 1, "lr": 0.1, "second_order": False}, "outer": {"steps": 2, "lr": 0.001},
            "meta_batch": 1, "val_every": 1, "val_episodes": 2, "checkpoint_every": 2, "seed": 0,
        },
        "adapt": {"support": str(root / "support" / "labels.csv"), "query": str(root / "query" / "labels.csv"),
                  "condition": RARE[0]},
        "evaluate": {
            "seeds": [0], "val_episodes": 2, "curve_steps": 1, "curve_episodes": 1,
            "finetune": {"steps": [1], "lrs": [0.05], "pretrain": {"max_epochs": 1, "max_images": 40}},
            "scratch": {"steps": [1], "lrs": [0.05]},
        },
    }  # fmt: skip
    path = root / "odd_names_suite.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def test_chain_runs_on_condition_names_full_of_punctuation(
    tmp_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _study(tmp_store / "study")
    res = run_chain(str(_suite(tmp_store / "study")))
    err = capsys.readouterr().err
    c = tracking.client()
    runs = {s: c.get_run(o.run_id) for s, o in res.outcomes.items()}
    assert set(runs) == {"ingest", "episodes", "meta-train", "adapt", "evaluate"}
    for stage, run in runs.items():
        assert run.info.status == "FINISHED", (stage, run.data.tags.get("fewscan.error"))
        keys = [*run.data.metrics, *run.data.params, *run.data.tags]
        bad = [k for k in keys if not is_valid_key(k)]
        assert not bad, (stage, bad)

    m = runs["ingest"].data.metrics
    assert m["label_images.Effusion_left"] == PER_CONDITION
    assert m["label_images.Pleural effusion_thickening"] == PER_CONDITION
    assert m["label_images.Ödem"] == PER_CONDITION and m["label_images.肺炎_viral"] == PER_CONDITION
    # case-only twins: two conditions, two keys, and a warning that names both
    twins = sorted(k for k in m if k.casefold().startswith("label_images.mass-"))
    assert len(twins) == 2 and {m[k] for k in twins} == {PER_CONDITION}
    assert "'Mass', 'mass'" in err and "differ only in case" in err
    report = tracking.UpstreamRun.from_id(runs["ingest"].info.run_id).read_json("ingest_report.json")
    assert report["label_metric_keys"]["Effusion (left)"] == "Effusion_left"
    assert len(report["label_key_collisions"]) == 1

    # episodes uses the same key for a condition as ingest
    ep = runs["episodes"].data
    assert ep.params["condition.Pleural effusion_thickening"] == "test"
    assert ep.params["condition.肺炎_viral"] == "test" and ep.params["condition.Ödem"] == "val"
    assert {k.split(".", 1)[1] for k in ep.params if k.casefold().startswith("condition.mass-")} == {
        t.split(".", 1)[1] for t in twins
    }
    # adapt registered the punctuated condition under a readable name of its own suite, version 1
    name = adapted_model_name("odd_names", RARE[0])
    assert name.startswith("fewscan-odd-names-pleural-effusion-thickening-")
    assert runs["adapt"].data.tags["fewscan.adapt.registered"] == f"{name}/1"
    assert any(k.startswith("test.maml.binary.k1.") for k in runs["evaluate"].data.metrics)
    split = tracking.UpstreamRun.from_id(runs["episodes"].info.run_id).read_json("split.json")
    assert json.dumps(split, ensure_ascii=False).count("Pleural effusion/thickening") >= 1  # names intact
