"""Labels: a CSV/TSV table joined to images, one folder per condition, or MedMNIST npz label arrays.

Joins on identifiers (SOPInstanceUID, StudyInstanceUID, patient id) happen on salted hashes: the table's
value is hashed with the same salt and namespace as the DICOM header's value inside the decode worker,
so clear identifiers never need to meet in one place. File-name and relative-path joins use the paths,
which stay on this machine (only their hashes reach the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from pipeline.errors import ConfigError, DataError
from pipeline.ingest.deid import age_bin, salted_key, sex_code
from pipeline.ingest.label_cells import LabelErrors, LabelParseError, check_name, row_labels, tidy
from pipeline.ingest.manifest import LabelsConfig

SCAN_EXTS = (".nii.gz", ".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg", ".nii")
HASHED_JOINS = {"sop_instance_uid": "sop", "study_instance_uid": "study", "patient_id": "patient"}


def strip_ext(name: str) -> str:
    low = name.lower()
    for e in SCAN_EXTS:
        if low.endswith(e):
            return name[: -len(e)]
    return name


def split_labels(text: str, separator: str, normal: str) -> list[str]:
    """'Effusion|Mass ' -> ['Effusion', 'Mass'] (sorted, unique); the normal label only when alone."""
    return tidy(str(text).split(separator), normal)  # "No Finding|Mass" is contradictory; the finding wins


@dataclass
class Row:
    labels: list[str]
    patient_key: str = ""
    age_bin: str = ""
    sex: str = ""
    # why the manifest's policy excludes this row (labels.uncertain/blank: exclude), else ""
    excluded: str = field(default="", kw_only=True)
    groups: dict[str, str] = field(default_factory=dict)  # labels.group_columns: column -> value


@dataclass
class LabelTable:
    join: str
    rows: dict[str, Row]
    by_stem: dict[str, str] = field(default_factory=dict)  # file_name join: stem -> table key
    used: set[str] = field(default_factory=set)

    def join_value(self, rel: str, item: dict[str, Any]) -> str:
        if self.join == "file_name":
            return rel.rpartition("/")[2]  # rel is a POSIX path relative to the scan root
        if self.join == "relative_path":
            return rel
        return str(
            item.get(
                {"sop": "sop_key", "study": "study_key", "patient": "patient_key"}[HASHED_JOINS[self.join]]
            )
            or ""
        )

    def lookup(self, rel: str, item: dict[str, Any]) -> Row | None:
        v = self.join_value(rel, item)
        if not v:
            return None
        key = v if v in self.rows else self.by_stem.get(strip_ext(v)) if self.join == "file_name" else None
        if key is None or key not in self.rows:
            return None
        self.used.add(key)
        return self.rows[key]

    def unused(self) -> list[str]:
        return sorted(k for k in self.rows if k not in self.used)


def _read_table(cfg: LabelsConfig) -> pd.DataFrame:
    path = Path(cfg.path)  # type: ignore[arg-type]
    if not path.is_file():
        raise DataError(
            f"label file {path} not found (labels.path; relative paths resolve against {Path.cwd()})"
        )
    sep = cfg.delimiter
    if sep == "auto":
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(
            f"label file {path.name} cannot be parsed as {'TSV' if sep == chr(9) else 'CSV'}: {type(e).__name__}"
        ) from None
    cols = list(df.columns)
    for key in ("key_column", "label_column", "patient_column", "age_column", "sex_column"):
        col = getattr(cfg, key)
        if col is not None and col not in df.columns:
            raise ConfigError(
                f"labels.{key} '{col}' is not a column of {path.name}; columns: {', '.join(map(str, cols))}"
            )
    absent = [c for c in cfg.label_columns or [] if c not in df.columns]
    if absent:
        raise ConfigError(
            f"labels.label_columns {absent} are not columns of {path.name}; columns: {', '.join(map(str, cols))}"
        )
    for col in cfg.group_columns:
        if col not in df.columns:
            raise ConfigError(
                f"labels.group_columns '{col}' is not a column of {path.name}; columns: {', '.join(map(str, cols))}"
            )
    return df


def load_table(cfg: LabelsConfig, salt: bytes) -> LabelTable:
    df = _read_table(cfg)
    rows: dict[str, Row] = {}
    kind = HASHED_JOINS.get(cfg.join)
    errors = LabelErrors(Path(cfg.path).name)  # type: ignore[arg-type]
    first_row: dict[str, int] = {}  # key -> data row that first named it (for conflict messages)
    # A table of 100k rows repeats its label cells (hundreds of distinct combinations), patients (a few
    # scans each), ages and sexes: each distinct value is parsed or hashed once. Columns are read as
    # lists, not as one dict per row (pandas' to_dict("records") alone cost seconds at NIH's size).
    label_cols = list(cfg.label_columns or []) if cfg.format == "one_hot" else [cfg.label_column or ""]
    cells: dict[tuple[str, ...], tuple[list[str], str] | str] = {}  # cells -> (labels, excluded) | error
    patients: dict[str, str] = {}
    ages: dict[str, str] = {}
    sexes: dict[str, str] = {}

    def column(name: str | None) -> list[Any]:
        return df[name].tolist() if name else [None] * len(df)

    key_col = column(cfg.key_column)
    lab_cols = [column(c) for c in label_cols]
    pat_col, age_col, sex_col = column(cfg.patient_column), column(cfg.age_column), column(cfg.sex_column)
    group_cols = {c: column(c) for c in cfg.group_columns}
    for i in range(len(df)):
        raw = str(key_col[i]).strip()
        if not raw:
            continue
        if cfg.join == "relative_path":
            raw = PurePosixPath(raw.replace("\\", "/")).as_posix().lstrip("./")
        key = salted_key(salt, kind, raw) if kind else raw
        cell = tuple(col[i] for col in lab_cols)
        parsed = cells.get(cell)
        if parsed is None:
            try:
                parsed = row_labels(dict(zip(label_cols, cell)), cfg)
            except LabelParseError as e:
                parsed = str(e)
            cells[cell] = parsed
        if isinstance(parsed, str):
            errors.add(i + 1, parsed)
            continue
        labs, excluded = parsed
        pk = ""
        if cfg.patient_column:
            pid = str(pat_col[i]).strip()
            if pid:
                pk = patients.get(pid) or patients.setdefault(pid, salted_key(salt, "patient", pid))
        if kind == "patient":
            pk = key
        row = Row(
            list(labs),
            pk,
            _memo(ages, age_col[i], age_bin) if cfg.age_column else "",
            _memo(sexes, sex_col[i], sex_code) if cfg.sex_column else "",
            {c: str(v[i]).strip() for c, v in group_cols.items()},
        )
        row.excluded = excluded
        first_row.setdefault(key, i + 1)
        if key in rows:  # repeated key (e.g. several rows per patient): labels are the union
            old = rows[key]
            if old.patient_key and row.patient_key and old.patient_key != row.patient_key:
                errors.add(
                    i + 1,
                    f"same {cfg.key_column!r} as data row {first_row[key]} but another {cfg.patient_column!r}: "
                    "one image cannot belong to two patients (fix the patient id, or the key)",
                )
            row.labels = tidy(old.labels + labs, cfg.normal_label)
            row.patient_key = old.patient_key or row.patient_key
            row.excluded = old.excluded or row.excluded
            row.groups = {c: old.groups.get(c) or v for c, v in row.groups.items()}
        rows[key] = row
    errors.raise_if_any()
    table = LabelTable(cfg.join, rows)
    if cfg.join == "file_name":
        stems: dict[str, list[str]] = {}
        for k in rows:
            stems.setdefault(strip_ext(k), []).append(k)
        table.by_stem = {s: ks[0] for s, ks in stems.items() if len(ks) == 1}
    return table


def _memo(seen: dict[str, str], value: Any, fn: Any) -> str:
    """fn(value), computed once per distinct value (values are the table's cells, as strings)."""
    v = str(value)
    out = seen.get(v)
    if out is None:
        out = seen[v] = fn(v)
    return out


def folder_label(rel: str) -> str | None:
    """folder-per-condition: 'Pneumonia/patient3/img.png' -> 'Pneumonia' (None for files at the root)."""
    parts = PurePosixPath(rel).parts
    return parts[0] if len(parts) > 1 else None


def check_folder_labels(rels: list[str]) -> None:
    """Condition folders whose names cannot be condition names ('|'): one error before any decode."""
    bad = sorted({f for f in map(folder_label, rels) if f and "|" in f})
    for name in bad[:1]:
        try:
            check_name(name)
        except LabelParseError as e:
            raise DataError(f"condition folder under scans.root: {e}; rename the folder") from None
