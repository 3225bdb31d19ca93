"""`fewscan predict`: new scans -> a CSV of class probabilities from an adapted model.

One row per scan: the file path (for a 3D model, a DICOM series' folder: its slices are one scan), the
predicted class (a binary model's: by the decision threshold stored in the model, docs/adapt.md), one
probability column per class, and an error column. An unreadable or mismatched file
gets a row with its error and empty probabilities, never a crash.
Every scan is preprocessed exactly like the meta-model's training data (inside the adapted model), and
a scan's probabilities do not depend on which other scans are in the same batch.

Nothing goes to MLflow. The CSV is the user's own local result and keeps each scan's clear path (that is
how a row is matched to its file). stderr, which ends up in terminals and CI logs, shows no path found in
the data, only the --input and --output the user typed: it names a scanned file by its salted file key
(ingest's `salted_key(salt, "file", path)`, ingest's salt file) and points at
`<local_report_dir>/predict.paths.json` (local only, next to the salt), which maps the key back.
"""

from __future__ import annotations

import csv
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.adapt.adapted import AdaptedClassifier, prob_column, torch_threads
from pipeline.adapt.ledger import PathLedger
from pipeline.adapt.listing import list_inputs
from pipeline.adapt.scan_read import scan_units
from pipeline.atomic import atomic_open
from pipeline.errors import ConfigError
from pipeline.ingest.deid import load_or_create_salt
from pipeline.progress import log

LEDGER_FILE = "predict.paths.json"


def write_predictions_csv(rows: list[dict[str, Any]], classes: list[str], output_csv: Path) -> None:
    """Write the rows atomically (pipeline/atomic.py): a crash never leaves half a CSV."""
    output_csv = Path(output_csv)
    if output_csv.is_dir():
        raise ConfigError("--output is a folder; give a file name such as predictions.csv")
    cols = ["path", "predicted_class", *(prob_column(c) for c in classes), "error"]
    with atomic_open(output_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            # an unscored row (error) has empty cells, not "nan": spreadsheets and pandas read both as missing
            w.writerow(
                {
                    k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for k, v in r.items()
                }
            )


def predict(
    model_uri: str,
    input_path: Path,
    output_csv: Path,
    batch_size: int = 64,
    threads: int | None = None,
    *,
    salt_file: Path = Path(".fewscan/salt"),
    local_report_dir: Path = Path(".fewscan/reports"),
) -> dict[str, Any]:
    """Predict every scan under `input_path` (a file or a folder) with the adapted model at `model_uri`.

    `threads`: torch CPU threads while scoring (None: the available CPUs, pipeline/cpus.py; 1 is fastest on a
    busy CPU).
    `model_uri`: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/adapted_model`, or a local
    folder holding the saved pyfunc model. `salt_file`, `local_report_dir`: as in the adapt config (ingest's
    salt; where `predict.paths.json` maps the file keys of log lines to paths). Returns a summary dict
    (counts, classes, output path, timing) for the caller; it holds clear paths, so it is not logged.
    """
    from pipeline.serving import load_adapted

    t0 = time.perf_counter()
    ledger = PathLedger(load_or_create_salt(salt_file), Path(local_report_dir) / LEDGER_FILE)
    files = list_inputs(Path(input_path), ledger)
    model: AdaptedClassifier = load_adapted(model_uri)
    refs = scan_units(files, model.spec, ledger, "predict")  # 3D model: one scan per DICOM series
    t_load = time.perf_counter() - t0
    with torch_threads(threads):
        rows = model.predict_refs(refs, batch_size=batch_size)
    for r, ref in zip(rows, refs):
        r["path"] = str(ref.path)
    write_predictions_csv(rows, model.classes, Path(output_csv))
    n_err = sum(1 for r in rows if r.get("error"))
    counts = Counter(r["predicted_class"] for r in rows if not r.get("error"))
    elapsed = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "model": model_uri,
        "output": str(output_csv),
        "classes": model.classes,
        "n_scans": len(rows),
        "n_predicted": len(rows) - n_err,
        "n_errors": n_err,
        "predicted": {c: counts.get(c, 0) for c in model.classes},
        "seconds_load": round(t_load, 3),
        "seconds_total": round(elapsed, 3),
    }
    per_class = ", ".join(f"{c}: {n}" for c, n in summary["predicted"].items())
    err = f"; {n_err} unreadable (see the error column)" if n_err else ""
    # --output as the user typed it (the CLI passes the full path of its default): a path the user gave is
    # shown back; only paths found in the data (the scans under --input) are named by their salted keys
    log(
        f"predicted {len(rows) - n_err}/{len(rows)} scans ({per_class}){err}, written to {output_csv} in {elapsed:.1f} s"
    )
    return summary
