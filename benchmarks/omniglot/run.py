"""Omniglot through the bring-your-own-data path (issue 15, item 4): PNGs + a label CSV + a data manifest +
a task suite, then the whole chain (ingest -> episodes -> meta-train -> evaluate), 5-way and 20-way 1-shot,
split by alphabet. Never part of the test run (tests/e2e/test_omniglot_benchmark.py runs a tiny smoke
version); results and how they were measured: benchmarks/RESULTS.md, "Omniglot".

Data: the two small background sets of Omniglot (Lake, Salakhutdinov & Tenenbaum 2015, MIT license),
`images_background_small1.zip` and `images_background_small2.zip` (default folder: ../shared/data/omniglot
next to the repository). Greek and Latin are in both zips with the same images: they are written once (a
differing duplicate stops the script). 8 alphabets, 242 characters, 20 drawings each, 105x105 black on white;
written inverted (strokes bright on black, as the MAML reference code feeds them) as 8-bit PNGs.

Usage (from any folder; the chain's MLflow store is <out>/mlflow):
    python benchmarks/omniglot/run.py                       # CPU budget, 5-way and 20-way
    python benchmarks/omniglot/run.py --budget gpu          # the MAML paper's budget (untested here: no GPU)
    python benchmarks/omniglot/run.py --prepare-only        # only the files, then `fewscan run <out>/omniglot_5way.yaml`
    python benchmarks/omniglot/run.py --ways 5 --within-alphabet --set meta_train.outer.steps=50
Everything generated (PNGs, labels.csv, manifest, suites, mlflow/) goes to --out (default
benchmarks/omniglot/data/, ignored by git); summary_<budget>.md there holds the result table.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import yaml
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "omniglot"
DEFAULT_OUT = HERE / "data"
# Split by alphabet (no test character's alphabet is meta-trained on). Every pool keeps >= 20 characters,
# so 20-way episodes exist in each; the two test alphabets hold 82 characters.
VALIDATION = ["Early_Aramaic", "Tagalog"]  # 22 + 17 characters
RARE = ["Korean", "Sanskrit"]  # 40 + 42 characters
# meta-train: Balinese, Greek, Japanese_(katakana), Latin (24 + 24 + 47 + 26 = 121 characters)
NORMAL = "none"  # Omniglot has no normal class: a label no row carries
PUBLIC_SALT = hashlib.sha256(b"fewscan-omniglot-salt").hexdigest()  # no PHI: a public, fixed salt

# Budgets: overrides of the generated suite, per n_way. "paper" = Finn et al. 2017 (MAML), Omniglot:
# Conv-4 with 64 filters, batch norm, inner lr 0.4, 1 inner step in training and 3 at test (5-way) or 5 and 5
# (20-way), meta-batch 32 (5-way) / 16 (20-way), 60,000 meta-steps, rotations by multiples of 90 degrees as
# new classes, second-order MAML; 98.7 % (5-way 1-shot) and 95.8 % (20-way 1-shot) on the full background set.
BUDGETS: dict[str, dict[int, dict[str, Any]]] = {
    # a few seconds per stage: the smoke test (tests/e2e/test_omniglot_benchmark.py)
    "smoke": {
        n: {
            "episodes": {"q_query": 2, "val_episodes": 4, "test_episodes": 10},
            "meta_train": {
                "methods": ["maml", "protonet"],
                "model": {"backbone": "conv4", "filters": 8, "blocks": 2, "norm": "group", "norm_groups": 4},
                "inner": {"steps": 1, "eval_steps": 2, "lr": 0.4},
                "outer": {"steps": 3, "lr": 0.003, "warmup_steps": 1},
                "meta_batch": 2,
                "train_episodes": {"q_query": 1},
                "val_every": 3,
                "val_episodes": 4,
                "checkpoint_every": 3,
                "seeds": [0],
            },
            "evaluate": {
                "val_episodes": 2,
                "curve_steps": 1,
                "curve_episodes": 1,
                "bootstrap": {"resamples": 200},
                "finetune": {"modes": ["head"], "steps": [2], "lrs": [0.1], "pretrain": {"max_epochs": 1}},
                "scratch": {"steps": [2], "lrs": [0.1]},
            },
        }
        for n in (3, 5, 20)
    },
    # what 2 shared CPU cores reach in about 25 minutes for both settings (benchmarks/RESULTS.md)
    "cpu": {
        n: {
            "episodes": {"q_query": 15, "val_episodes": 50, "test_episodes": 600 if n == 5 else 300},
            "meta_train": {
                "methods": ["maml", "protonet"],
                "model": {"backbone": "conv4", "filters": 32, "norm": "group"},
                # one inner step in training; test-time steps chosen on validation (evaluate.meta.steps):
                # trained with one first-order step at lr 0.4, three steps at test overshoot (measured)
                "inner": {"steps": 1, "lr": 0.4},
                "outer": {"steps": 600 if n == 5 else 300, "lr": 0.003, "warmup_steps": 20},
                "meta_batch": 32 if n == 5 else 8,
                "train_episodes": {"q_query": 1},  # as the MAML reference code: 1 query drawing per class
                "val_every": 100,
                "val_episodes": 50,
                "checkpoint_every": 100,
                "seeds": [0],
                # one torch thread: on a shared, oversubscribed 2-core machine two threads made a Conv-4
                # step ~50x slower (OpenMP threads waiting on each other; benchmarks/RESULTS.md, "Omniglot")
                "threads": 1,
            },
            "evaluate": {
                "threads": 1,
                "val_episodes": 20,
                "curve_steps": 5,
                "curve_episodes": 20,
                "meta": {"steps": [1, 3] if n == 5 else [1, 3, 5]},
                "finetune": {
                    "modes": ["head", "whole"],
                    "steps": [10],
                    "lrs": [0.01, 0.1],
                    "pretrain": {"max_epochs": 20, "patience": 4},
                },
                "scratch": {"steps": [10], "lrs": [0.01, 0.1]},
            },
        }
        for n in (5, 20)
    },
    # The MAML paper's Omniglot budget, one command on a GPU machine (NOT run here: no GPU was at hand).
    "gpu": {
        n: {
            "episodes": {"q_query": 15, "val_episodes": 100, "test_episodes": 600},
            "meta_train": {
                "methods": ["maml", "protonet"],
                "model": {"backbone": "conv4", "filters": 64, "norm": "batch_transductive"},
                "inner": {
                    "steps": 1 if n == 5 else 5,
                    "eval_steps": 3 if n == 5 else 5,
                    "lr": 0.4,
                    "second_order": True,
                },
                "outer": {"steps": 60000, "lr": 0.001, "schedule": "constant", "warmup_steps": 0},
                "meta_batch": 32 if n == 5 else 16,
                # rotations as new classes (Santoro et al. 2016, as MAML did); ProtoNet with Snell et al.'s
                # training episodes: 60 ways, 5 query drawings (docs/tasks.md, "Training episodes")
                "train_episodes": {
                    "q_query": 1,
                    "rotations": [0, 90, 180, 270],
                    "per_method": {"protonet": {"n_way": 60, "q_query": 5}},
                },
                "val_every": 1000,
                "val_episodes": 100,
                "checkpoint_every": 1000,
                "seeds": [0, 1, 2],
                "device": "cuda",
            },
            "evaluate": {
                "device": "cuda",
                "val_episodes": 50,
                "curve_steps": 10,
                "curve_episodes": 100,
                "finetune": {"modes": ["head", "whole"], "steps": [10, 25], "lrs": [0.01, 0.1]},
                "scratch": {"steps": [25, 50], "lrs": [0.01, 0.1]},
            },
        }
        for n in (5, 20)
    },
}
IMAGE_SIZE = {"smoke": 14, "cpu": 28, "gpu": 28}

SUITE_HEADER = """\
# Omniglot, {n_way}-way 1-shot, split by alphabet: written by benchmarks/omniglot/run.py (budget '{budget}');
# edit the script, not this file. Results: benchmarks/RESULTS.md, "Omniglot". Every key: docs/tasks.md.
#
# Conditions. Each character ("<Alphabet>/characterNN") is a condition. Omniglot has no normal class, so
# episodes are n_way only and the manifest's normal_label is a label no row carries.
# Split by alphabet: meta-train on {train}, validation on {val}, test on {rare}: no test character's
# alphabet is seen in meta-training (harder than the MAML paper's split by character).
#
# Patients. Omniglot has none; the manifest's patient column is the drawing (`<imageid>_<drawer>`, one per
# image). Why not the drawer: (1) within a character the 20 drawings are by 20 different people, so support
# and query of a class come from different drawers whatever the patient column says; (2) the data do not
# say that drawer number NN is one person across characters; (3) with the drawer number (labels.csv column
# `drawer`) as the patient, every drawer has test-alphabet drawings, the split's first pool rule sends all
# of them to the test pool, and the episodes stage stops with an error naming that rule; with
# `<alphabet>/NN` a patient gives at most one drawing to an episode, so an episode inside one alphabet
# could hold only 20 drawings: no within-alphabet 20-way 1-shot episode with a query would exist.
# The drawing as the patient keeps every guarantee that matters here: a drawing is never in two pools, and
# never twice in an episode.
{grouping}"""

GROUPING = """\
#
# Within-alphabet episodes (episodes.group_by: alphabet, the column the manifest's labels.group_columns
# carries into the scan index): every episode's characters come from one alphabet, as in Lake et al.'s
# one-shot protocol; meta-training episodes too. Alphabets with fewer than n_way characters hold none.
"""


def _alphabet_split(alphabet: str) -> str:
    return "rare" if alphabet in RARE else "validation" if alphabet in VALIDATION else "common"


def unpack(
    source: Path, png_root: Path, per_alphabet: int | None = None, zips: tuple[str, ...] = ZIPS
) -> list[dict[str, str]]:
    """Write every drawing once as an inverted 8-bit PNG under png_root/<Alphabet>/<character>/; returns
    the label rows. `per_alphabet` keeps only the first N characters of each alphabet (smoke test)."""
    seen: dict[str, str] = {}  # relative path -> sha256 of the zip member
    rows: list[dict[str, str]] = []
    for name in zips:
        path = source / name
        if not path.is_file():
            raise SystemExit(f"{path} not found (--source: the folder holding {', '.join(zips)})")
        with zipfile.ZipFile(path) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                parts = PurePosixPath(info.filename).parts
                if len(parts) != 4 or not parts[3].endswith(".png"):
                    continue
                _, alphabet, character, file = parts
                if per_alphabet is not None and int(character.removeprefix("character")) > per_alphabet:
                    continue
                rel = f"{alphabet}/{character}/{file}"
                data = zf.read(info)
                digest = hashlib.sha256(data).hexdigest()
                if rel in seen:  # Greek and Latin are in both zips
                    if seen[rel] != digest:
                        raise SystemExit(f"{rel} differs between the two zips: not the documented duplicates")
                    continue
                seen[rel] = digest
                img = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.uint8)
                dest = png_root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(255 - img).save(dest)
                stem = file.removesuffix(".png")
                rows.append(
                    {
                        "file": file,
                        "character": f"{alphabet}/{character}",
                        "alphabet": alphabet,
                        "drawer": stem.split("_")[1],
                        "drawing": stem,
                    }
                )
    files = [r["file"] for r in rows]
    if len(set(files)) != len(files):
        raise SystemExit("two drawings share a file name: the label table joins on file names")
    return rows


def write_study(out: Path, rows: list[dict[str, str]], size: int) -> Path:
    """labels.csv, the data manifest and the public salt; returns the manifest's path."""
    with (out / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "character", "alphabet", "drawer", "drawing"])
        w.writeheader()
        w.writerows(rows)
    (out / "salt").write_text(PUBLIC_SALT + "\n")
    manifest = {
        "name": "omniglot",
        "scans": {"root": str(out / "png"), "formats": ["png"]},
        "labels": {
            "source": "csv",
            "path": str(out / "labels.csv"),
            "join": "file_name",
            "key_column": "file",
            "label_column": "character",
            "patient_column": "drawing",  # why: the suite's header
            "normal_label": NORMAL,
            "group_columns": ["alphabet"],  # for episodes.group_by: alphabet (docs/ingest.md)
        },
        "preprocess": {"image_size": [size, size], "channels": 1, "normalize": "unit"},
        "salt_file": str(out / "salt"),
        "cache_dir": str(out / ".cache"),
        "local_report_dir": str(out / ".reports"),
        "workers": 0,
    }
    path = out / "omniglot.yaml"
    path.write_text(
        "# Omniglot background small1 + small2, written by benchmarks/omniglot/run.py. Keys: docs/ingest.md.\n"
        "# Public salt: Omniglot holds no patient information, and a fixed salt keeps the scan keys, hence the\n"
        "# split and the episodes, the same on every machine.\n" + yaml.safe_dump(manifest, sort_keys=False)
    )
    return path


def _deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        base[k] = _deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def write_suite(
    out: Path, manifest: Path, rows: list[dict[str, str]], n_way: int, budget: str, within_alphabet: bool
) -> Path:
    chars: dict[str, list[str]] = {"common": [], "validation": [], "rare": []}
    alphabets: dict[str, list[str]] = {"common": [], "validation": [], "rare": []}
    for ch in sorted({r["character"] for r in rows}):
        alphabet = ch.split("/")[0]
        chars[_alphabet_split(alphabet)].append(ch)
        if alphabet not in alphabets[_alphabet_split(alphabet)]:
            alphabets[_alphabet_split(alphabet)].append(alphabet)
    suffix = "_alphabet" if within_alphabet else ""
    suite: dict[str, Any] = {
        "name": f"omniglot_{n_way}way{suffix}_{budget}",
        "description": f"Omniglot {n_way}-way 1-shot, split by alphabet ({budget} budget)",
        "dataset": str(manifest),
        "episodes": {
            "split": {"validation": chars["validation"], "rare": chars["rare"]},  # common: the rest
            "kinds": ["n_way"],
            "n_way": n_way,
            "k_shot": [1],
            "seed": 0,
            "on_insufficient": "fail",
        },
    }
    if within_alphabet:
        suite["episodes"]["group_by"] = "alphabet"
    _deep_update(suite, BUDGETS[budget][n_way])
    header = SUITE_HEADER.format(
        n_way=n_way,
        budget=budget,
        train=", ".join(alphabets["common"]),
        val=", ".join(alphabets["validation"]),
        rare=", ".join(alphabets["rare"]),
        grouping=GROUPING if within_alphabet else "",
    )
    path = out / f"{suite['name']}.yaml"
    path.write_text(header + yaml.safe_dump(suite, sort_keys=False, width=110))
    return path


def prepare(
    out: Path,
    source: Path = DEFAULT_SOURCE,
    budget: str = "cpu",
    ways: tuple[int, ...] = (5, 20),
    within_alphabet: bool = False,
    per_alphabet: int | None = None,
    zips: tuple[str, ...] = ZIPS,
) -> list[Path]:
    """PNGs, labels.csv, the manifest and one suite per n_way under `out`; returns the suites' paths."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = unpack(source, out / "png", per_alphabet, zips)
    manifest = write_study(out, rows, IMAGE_SIZE[budget])
    n_chars = len({r["character"] for r in rows})
    print(f"omniglot: {len(rows)} drawings of {n_chars} characters -> {out}", flush=True)
    return [write_suite(out, manifest, rows, n, budget, within_alphabet) for n in ways]


def summarize(suite: Path, result: Any) -> dict[str, Any]:
    """Per method: accuracy and intervals from the evaluate run's results.json; wall time per stage."""
    from pipeline import tracking
    from pipeline.artifacts import ResultsFile, read_artifact

    c = tracking.client()
    walls = {}
    for stage, oc in result.outcomes.items():
        info = c.get_run(oc.run_id).info
        walls[stage] = (info.end_time - info.start_time) / 1000 if info.end_time else float("nan")
    up = tracking.UpstreamRun.from_id(result.outcomes["evaluate"].run_id)
    res = read_artifact(ResultsFile, up.artifact(ResultsFile.FILE))
    table = {}
    for group, comp in res.comparisons.items():
        for method, acc in comp["acc"].items():
            pat = (comp.get("acc_patient") or {}).get(method) or {}
            table[f"{group} {method}"] = {
                "mean": acc["mean"],
                "ci95": acc["ci95"],
                "patient_low": pat.get("low"),
                "patient_high": pat.get("high"),
            }
    return {"suite": suite.stem, "walls": walls, "methods": table}


def markdown(summaries: list[dict[str, Any]], budget: str, command: str, load: str, wall: float) -> str:
    lines = [
        f"Budget `{budget}`, command `{command}`, {platform.node() or 'host'}, load before: {load}, "
        f"total wall {wall / 60:.1f} min",
        "",
    ]
    for s in summaries:
        lines += [f"**{s['suite']}** (stage walls: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in s["walls"].items()) + ")", "",
                  "| group / method | accuracy % ± episode CI | drawing-level CI % |", "|---|---|---|"]  # fmt: skip
        for name, m in sorted(s["methods"].items(), key=lambda kv: -kv[1]["mean"]):
            ci = f" ± {m['ci95'] * 100:.1f}" if m["ci95"] is not None else ""
            pat = (
                f"[{m['patient_low'] * 100:.1f}, {m['patient_high'] * 100:.1f}]"
                if m["patient_low"] is not None
                else "-"
            )
            lines.append(f"| {name} | {m['mean'] * 100:.1f}{ci} | {pat} |")
        lines.append("")
    return "\n".join(lines)


def run(suites: list[Path], out: Path, overrides: list[str], force: bool) -> list[dict[str, Any]]:
    """The chain for each suite, in `out` (its ./mlflow store), in this process."""
    from pipeline.chain import run_chain

    os.chdir(out)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return [summarize(s, run_chain(str(s), overrides, force=force)) for s in suites]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder holding the two zips")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where everything is generated")
    ap.add_argument(
        "--zips",
        default=",".join(ZIPS),
        help="zip files in --source, comma-separated (the full set: images_background.zip)",
    )
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--ways", default="5,20", help="n_way settings, e.g. 5,20")
    ap.add_argument("--within-alphabet", action="store_true", help="episodes.group_by: alphabet")
    ap.add_argument("--characters-per-alphabet", type=int, default=None, help="keep the first N (smoke)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="suite override")
    ap.add_argument("--force", action="store_true", help="recompute stages even when a run can be reused")
    ap.add_argument("--prepare-only", action="store_true", help="write the files, run nothing")
    args = ap.parse_args(argv)
    ways = tuple(int(w) for w in args.ways.split(",") if w.strip())
    bad = [w for w in ways if w not in BUDGETS[args.budget]]
    if bad:
        raise SystemExit(
            f"budget '{args.budget}' has settings for n_way {sorted(BUDGETS[args.budget])}, not {bad}"
        )
    out = args.out.resolve()
    t0 = time.monotonic()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    zips = tuple(z.strip() for z in args.zips.split(",") if z.strip())
    suites = prepare(
        out, args.source, args.budget, ways, args.within_alphabet, args.characters_per_alphabet, zips
    )
    if args.prepare_only:
        print("\n".join(f"fewscan run {s}" for s in suites))
        return 0
    summaries = run(suites, out, args.set, args.force)
    command = "python benchmarks/omniglot/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(summaries, args.budget, command.strip(), load, time.monotonic() - t0)
    (out / f"summary_{args.budget}.md").write_text(text)
    (out / f"summary_{args.budget}.json").write_text(json.dumps(summaries, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
