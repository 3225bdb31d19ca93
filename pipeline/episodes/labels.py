"""The scan index as arrays: a boolean finding matrix and integer patient codes, parsed once.

Everything downstream (split, samplers, audit) works on these arrays with numpy, so that a
ChestX-ray14-sized index (112k scans) is parsed in a fraction of a second and no per-episode work
touches every scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from pipeline.errors import DataError

REQUIRED_COLUMNS = ("scan_key", "patient_key", "labels")


@dataclass(frozen=True)
class LabelTable:
    scan_keys: np.ndarray  # (N,) str, row i of the scan index
    scan_rank: np.ndarray  # (N,) int64, rank of the scan key: orders scans independently of row order
    patient_codes: np.ndarray  # (N,) int64, index into `patient_keys`
    patient_keys: np.ndarray  # (P,) str, sorted unique patient keys
    names: list[str]  # condition names (findings), normal label excluded, sorted
    findings: np.ndarray  # (N, L) bool, findings[i, j] = scan i carries names[j]
    is_normal: np.ndarray  # (N,) bool, labels exactly == normal_label
    normal_label: str
    # Episodes within a group (EpisodesConfig.group_by): the column, its sorted distinct values and
    # each scan's code into them; None / [] / empty when the table was built without grouping.
    group_by: str | None = None
    group_names: list[str] = field(default_factory=list)
    group_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_findings(self) -> np.ndarray:
        return self.findings.sum(axis=1)

    def code(self, name: str) -> int:
        return self.names.index(name)

    @cached_property
    def lookup(self) -> pd.Index:
        """scan_key -> row, built once (an object Index hashes Python strings fastest)."""
        return pd.Index(self.scan_keys.astype(object), dtype=object)

    def rows_of(self, keys: list[str] | np.ndarray) -> np.ndarray:
        """Rows of `keys` in the index, -1 for a key that is not there."""
        return self.lookup.get_indexer(pd.Index(np.asarray(keys, dtype=object), dtype=object))

    @classmethod
    def from_index(
        cls,
        index: pd.DataFrame,
        normal_label: str,
        label_names: list[str] | None = None,
        group_by: str | None = None,
    ) -> LabelTable:
        missing = [c for c in REQUIRED_COLUMNS if c not in index.columns]
        if missing:
            raise DataError(
                f"scan index lacks column(s) {missing}; it has {list(index.columns)} "
                "(is it the store/scan_index.parquet of an ingest run?)"
            )
        group_names: list[str] = []
        group_codes = np.zeros(0, dtype=np.int64)
        if group_by is not None:
            group_names, group_codes = _groups(index, group_by)
        # Fixed-width unicode arrays sort in C (object arrays compare Python strings one pair at a time).
        scan_keys = np.asarray(index["scan_key"].astype(str).to_numpy(), dtype=str)
        order = np.argsort(scan_keys, kind="stable")
        dup = int((scan_keys[order[1:]] == scan_keys[order[:-1]]).sum())
        if dup:
            raise DataError(f"scan index has {dup} duplicate scan_key value(s); re-run ingest")
        scan_rank = np.empty(len(scan_keys), dtype=np.int64)  # orders scans independently of row order
        scan_rank[order] = np.arange(len(scan_keys))
        # Sorted unique keys make patient codes independent of row order (determinism from the seed).
        patient_keys, patient_codes = np.unique(
            np.asarray(index["patient_key"].astype(str).to_numpy(), dtype=str), return_inverse=True
        )
        labels = index["labels"].fillna("").astype(str).to_numpy()
        is_normal = labels == normal_label

        # Parse each distinct label string once (a few hundred), then broadcast to the scans.
        label_codes, uniq = pd.factorize(labels)
        parsed = [[t for t in str(u).split("|") if t and t != normal_label] for u in uniq]
        seen = {t for toks in parsed for t in toks}
        names = sorted((set(label_names or []) - {normal_label}) | seen)
        col = {n: j for j, n in enumerate(names)}
        uniq_findings = np.zeros((len(uniq), len(names)), dtype=bool)  # (U, L)
        for u, toks in enumerate(parsed):
            uniq_findings[u, [col[t] for t in toks]] = True
        findings = uniq_findings[label_codes] if len(labels) else np.zeros((0, len(names)), dtype=bool)
        return cls(
            scan_keys=scan_keys,
            scan_rank=scan_rank,
            patient_codes=np.asarray(patient_codes, dtype=np.int64).reshape(-1),
            patient_keys=patient_keys,
            names=names,
            findings=findings,
            is_normal=is_normal,
            normal_label=normal_label,
            group_by=group_by,
            group_names=group_names,
            group_codes=group_codes,
        )

    def condition_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Images and distinct patients per condition, each (L,) int64."""
        images = self.findings.sum(axis=0).astype(np.int64)
        n_p = len(self.patient_keys)
        patients = np.zeros(len(self.names), dtype=np.int64)
        for j in range(len(self.names)):  # L is small (tens); each step is vectorised over scans
            has = np.zeros(n_p, dtype=bool)
            has[self.patient_codes[self.findings[:, j]]] = True
            patients[j] = int(has.sum())
        return images, patients


def _groups(index: pd.DataFrame, column: str) -> tuple[list[str], np.ndarray]:
    """Sorted distinct values of `column` and each scan's code into them; every scan needs a value."""
    if column not in index.columns:
        raise DataError(
            f"episodes.group_by '{column}' is not a column of the scan index (columns: "
            f"{', '.join(map(str, index.columns))}). A label-table column reaches the index through the "
            "data manifest's labels.group_columns (docs/ingest.md); re-run ingest after adding it"
        )
    values = index[column].fillna("").astype(str).str.strip().to_numpy()
    empty = int((values == "").sum())
    if empty:
        raise DataError(
            f"episodes.group_by '{column}': {empty} of {len(values)} scans have no value, so they belong to "
            "no group. Fill the column in the label file (or drop those rows) and re-run ingest"
        )
    names, codes = np.unique(np.asarray(values, dtype=str), return_inverse=True)
    return [str(n) for n in names], np.asarray(codes, dtype=np.int64).reshape(-1)


def eligible(table: LabelTable, rows: np.ndarray, cls: int, others: list[int], policy: str) -> np.ndarray:
    """Which of `rows` count as an example of condition `cls` in an episode whose other condition
    classes are `others` (bool mask over `rows`).

    exclusive_in_episode: the scan carries `cls` and none of `others` (its other findings are not
    classes of this episode, so its label in the episode is unambiguous).
    single_finding: the scan carries `cls` and no other finding at all.
    """
    f = table.findings[rows]
    ok = f[:, cls].copy()
    if policy == "single_finding":
        ok &= f.sum(axis=1) == 1
    elif others:
        ok &= ~f[:, others].any(axis=1)
    return ok
