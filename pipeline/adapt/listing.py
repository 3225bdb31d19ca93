"""Listing a labelled support (or query) set, and the scans to predict, in a deterministic order.

A set is either a folder with one subfolder per class (`Hernia/`, `No Finding/`, files may sit in
nested series folders) or a label CSV with the columns `path,label` (relative paths resolve against the
CSV's folder; for a 3D model a row may name a series folder). Listing reads no pixels: reading is
`pipeline/adapt/scan_read.py`, loading a set `pipeline/adapt/support.py`. A bad set fails with a message
that names the fix and no path (`pipeline/adapt/ledger.py`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from pipeline.adapt.ledger import PathLedger, fail, scrub
from pipeline.errors import ConfigError, DataError
from pipeline.progress import log

# Files in a scan folder that are never scans (a README next to the DICOMs is not an "unreadable scan").
NON_SCAN_SUFFIXES = frozenset(
    {".txt", ".md", ".csv", ".tsv", ".json", ".yaml", ".yml", ".xml", ".html", ".pdf"}
)


@dataclass(frozen=True)
class ScanRef:
    path: Path  # the scan's file; for a DICOM series, the folder that holds its slices
    label: str | None  # None for unlabelled scans (predict)
    shown: str  # path relative to the set's root: local only, never for MLflow nor logs (they use file keys)
    members: tuple[Path, ...] = ()  # the slice files of a DICOM series (3D), sorted; () for a single file


def is_candidate(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in NON_SCAN_SUFFIXES


def files_under(folder: Path) -> list[Path]:
    # sorted: the order of the support set is the order of the rows of x_s, so it must not depend on the
    # file system's enumeration order
    return sorted(
        (p for p in folder.rglob("*") if is_candidate(p) and not any(s.startswith(".") for s in p.parts)),
        key=lambda p: str(p),
    )


def list_labelled(source: Path, what: str = "support", ledger: PathLedger | None = None) -> list[ScanRef]:
    """The labelled scans of a class-folder tree or a `path,label` CSV, in a deterministic order.

    `ledger`: where log lines about a file record its clear path (see PathLedger)."""
    source = Path(source)
    if not source.exists():
        fail(
            ConfigError,
            f"{what} set not found (give a folder with one subfolder per class, or a CSV)",
            source,
            ledger,
        )
    if source.is_file():
        return _list_csv(source, what, ledger)
    class_dirs = sorted(
        (d for d in source.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )
    if not class_dirs:
        fail(
            DataError,
            f"the {what} folder has no class subfolders: put each class's scans in a subfolder named "
            "after the class, e.g. Hernia/ and 'No Finding'/",
            source,
            ledger,
        )
    loose = sorted(p for p in source.iterdir() if is_candidate(p))
    if loose:
        note = "ignored: directly in the set's folder, not in a class subfolder"
        named = ""
        if ledger is not None:
            keys = ledger.record([(p, note) for p in loose])
            named = f" ({', '.join(f'file {k}' for k in keys)}; {ledger.where()})"
        log(
            f"{what}: ignoring {len(loose)} file(s) directly in the {what} folder{named}: "
            "scans belong in a class subfolder"
        )
    refs: list[ScanRef] = []
    for d in class_dirs:
        files = files_under(d)
        if not files:
            fail(
                DataError,
                f"{what} class folder '{d.name}' holds no scan files: add scans of class "
                f"'{d.name}' or remove the empty folder",
                d,
                ledger,
            )
        refs.extend(ScanRef(path=f, label=d.name, shown=str(f.relative_to(source))) for f in files)
    return refs


def _list_csv(path: Path, what: str, ledger: PathLedger | None) -> list[ScanRef]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
            cols = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    except (UnicodeDecodeError, csv.Error) as err:
        fail(
            ConfigError, f"the {what} label file is not a readable CSV: {scrub(str(err), path)}", path, ledger
        )
    if not rows:
        fail(
            DataError,
            f"the {what} label file has no rows (expected a header 'path,label' and one row per scan)",
            path,
            ledger,
        )
    if "path" not in cols or "label" not in cols:
        fail(
            ConfigError,
            f"the {what} label file needs the columns 'path' and 'label'; it has: {', '.join(cols)}",
            path,
            ledger,
        )
    refs: list[ScanRef] = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        norm = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        rel, label = norm["path"], norm["label"]
        if not rel or not label:
            fail(DataError, f"the {what} label file, line {i}: empty path or label", path, ledger)
        p = Path(rel)
        p = p if p.is_absolute() else path.parent / p
        refs.append(ScanRef(path=p, label=label, shown=rel))
    return refs


def list_inputs(source: Path, ledger: PathLedger | None = None) -> list[ScanRef]:
    """Unlabelled scans to predict: one file, or every candidate file under a folder (recursively)."""
    source = Path(source)
    if source.is_file():
        return [ScanRef(path=source, label=None, shown=str(source))]
    if not source.is_dir():
        fail(ConfigError, "input not found (give a scan file or a folder of scans)", source, ledger)
    files = files_under(source)
    if not files:
        # `source` is the --input the user typed (predict; nothing goes to MLflow): shown as typed
        fail(
            DataError,
            f"--input {source}: the folder holds no scan files (only hidden files or reports/notes such as "
            ".txt, .csv, .json); give the folder that holds the scans",
            source,
            ledger,
        )
    return [ScanRef(path=f, label=None, shown=str(f)) for f in files]
