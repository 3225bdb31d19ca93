"""A labelled support (or query) set, read and ready for the inner loop (`load_labelled` -> `LabelledSet`).

Listing the set is `pipeline/adapt/listing.py`, reading each scan as ingest would
`pipeline/adapt/scan_read.py` (through ingest's API, pipeline/ingest/reading.py), naming files in log
lines without their paths `pipeline/adapt/ledger.py`, what the meta-model expects of a scan
`pipeline/adapt/scan_spec.py`. This module decides which scans the set keeps: unreadable ones are
reported and skipped, a scan that does not fit the meta-model refuses the whole set, a duplicate is used
once, and every class needs `adapt.min_per_class` scans.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# the names adapt's stage imports from here (pipeline/adapt/stage.py): the set's parts, re-exported
from pipeline.adapt.ledger import PathLedger as PathLedger
from pipeline.adapt.ledger import fail, scrub
from pipeline.adapt.listing import ScanRef
from pipeline.adapt.listing import list_labelled as list_labelled
from pipeline.adapt.reports import write_json_atomic as write_json_atomic
from pipeline.adapt.scan_read import content_key, read_scan, read_series, scan_units, series_key
from pipeline.adapt.scan_spec import ScanMismatch, ScanSpec, dims_mismatch
from pipeline.errors import ConfigError, DataError
from pipeline.ingest.deid import salted_key
from pipeline.progress import log, progress


def order_classes(labels: Sequence[str], condition: str | None, normal_label: str) -> list[str]:
    """Label index order: the condition first, the normal class last, any others in between (sorted).

    The same convention as the binary episodes the meta-model was trained and evaluated on
    (`classes == [condition, normal]`), so sensitivity is recall of index 0.
    """
    present = sorted(set(labels))
    if len(present) < 2:
        raise DataError(
            f"the support set has {len(present)} class(es) ({', '.join(present) or 'none'}); "
            "adaptation needs at least two, e.g. the condition and 'No Finding'"
        )
    if condition is None:
        others = [c for c in present if c != normal_label]
        if len(others) != 1:
            raise ConfigError(
                f"cannot tell which class is the condition among {', '.join(present)}: set adapt.condition "
                "(--condition NAME)"
            )
        condition = others[0]
    if condition not in present:
        raise ConfigError(
            f"condition '{condition}' is not a class of the support set; its classes are: {', '.join(present)}"
        )
    middle = [c for c in present if c not in (condition, normal_label)]
    tail = [normal_label] if normal_label in present and normal_label != condition else []
    return [condition, *middle, *tail]


@dataclass
class Rejected:
    ref: ScanRef
    key: str
    reason: str


@dataclass
class LabelledSet:
    """A labelled set ready for the inner loop: x (n, C, H, W) float32, y (n,) int64 = index in classes."""

    classes: list[str]
    x: torch.Tensor
    y: torch.Tensor
    keys: list[str]
    rejected: list[Rejected] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c = Counter(int(v) for v in self.y.tolist())
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    def report(self) -> dict[str, Any]:
        """De-identified summary for MLflow: salted keys, class names, reasons; no paths."""
        return {
            "classes": self.classes,
            "counts": self.counts(),
            "accepted": [
                {"scan_key": k, "label": self.classes[int(v)]} for k, v in zip(self.keys, self.y.tolist())
            ],
            "rejected": [
                {"scan_key": r.key, "label": r.ref.label, "reason": r.reason} for r in self.rejected
            ],
        }

    def local_report(self) -> dict[str, Any]:
        """Same with clear paths: written only next to the salt, never to MLflow."""
        return {
            "rejected": [
                {"path": str(r.ref.path), "scan_key": r.key, "reason": r.reason} for r in self.rejected
            ],
        }


def load_labelled(
    refs: Sequence[ScanRef],
    classes: Sequence[str],
    spec: ScanSpec,
    salt: bytes,
    min_per_class: int = 1,
    what: str = "support",
    reader: Callable[[Path, ScanSpec], np.ndarray] = read_scan,
    ledger: PathLedger | None = None,
) -> LabelledSet:
    """Read and preprocess every scan; unreadable ones are reported and skipped if enough remain.

    A scan that is readable but does not match the meta-model refuses the whole set: a CT among chest
    radiographs means the wrong folder was given, and silently dropping it would hide that.
    Log lines name a file by its key; `ledger` records the clear paths locally (None: keys only).
    """
    ledger = ledger if ledger is not None else PathLedger(salt, None)
    refs = scan_units(refs, spec, ledger, what)  # 3D: one ref per DICOM series, not per slice
    index = {c: i for i, c in enumerate(classes)}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    keys: list[str] = []
    seen: dict[str, str] = {}  # key -> label
    rejected: list[Rejected] = []
    mismatched: list[tuple[ScanRef, str]] = []
    for ref in progress(refs, total=len(refs), desc=f"reading {what} scans"):
        if ref.label not in index:
            fail(
                DataError,
                f"a {what} scan has label '{ref.label}', not one of the support classes: {', '.join(classes)}",
                ref.path,
                ledger,
            )
        if not ref.members and ref.path.is_dir():  # a CSV row naming a folder, for a 2D model
            mismatched.append((ref, str(dims_mismatch(spec))))
            continue
        try:
            datas = [m.read_bytes() for m in ref.members] if ref.members else [ref.path.read_bytes()]
        except OSError as err:
            rejected.append(
                Rejected(
                    ref,
                    salted_key(salt, "adapt-path", str(ref.path)),
                    f"cannot open file: {err.strerror or type(err).__name__}",
                )
            )
            continue
        key = series_key(salt, datas) if ref.members else content_key(salt, datas[0])
        if key in seen:
            if seen[key] != ref.label:
                fail(
                    DataError,
                    f"the same scan appears in {what} classes '{seen[key]}' and '{ref.label}': "
                    "a scan can have only one label here",
                    ref.path,
                    ledger,
                )
            dup = ledger.cite(ref.path, f"{what}: duplicate of another '{ref.label}' scan, used once")
            log(f"{what}: {dup} is a duplicate of another '{ref.label}' scan; using it once")
            continue
        try:
            # a series is decoded once, from the bytes already read for its key
            arr = read_series(list(zip(ref.members, datas)), spec) if ref.members else reader(ref.path, spec)
        except ScanMismatch as err:
            mismatched.append((ref, scrub(str(err), ref.path)))
            continue
        except DataError as err:
            rejected.append(Rejected(ref, key, scrub(str(err), ref.path)))
            continue
        seen[key] = ref.label
        xs.append(arr)
        ys.append(index[ref.label])
        keys.append(key)

    # one rewrite of the local report for all of them, then one line each naming the file by its key
    notes = [(r.ref.path, f"{what}: skipped unreadable scan: {r.reason}") for r in rejected]
    notes += [(ref.path, f"{what}: does not match the meta-model: {why}") for ref, why in mismatched]
    file_keys = ledger.record(notes)
    for k, r in zip(file_keys, rejected):
        log(f"{what}: skipped unreadable scan, file {k} ({ledger.where()}): {r.reason}")
    if mismatched:
        for k, (_ref, why) in zip(file_keys[len(rejected) :], mismatched):
            log(f"{what}: file {k} ({ledger.where()}) does not match the meta-model: {why}")
        reasons = Counter(why for _, why in mismatched)
        top, n_top = reasons.most_common(1)[0]
        raise ScanMismatch(
            f"{len(mismatched)} of {len(refs)} {what} scans do not match the meta-model ({n_top}x: {top}); "
            "they are listed above. Use scans of the modality and kind the meta-model was trained on, or "
            "meta-train on data like them"
        )
    counts = Counter(ys)
    short = {c: counts.get(i, 0) for i, c in enumerate(classes) if counts.get(i, 0) < min_per_class}
    if short:
        bad = Counter(r.ref.label for r in rejected)
        parts = [
            f"'{c}': {n} readable" + (f" ({bad[c]} unreadable)" if bad.get(c) else "")
            for c, n in short.items()
        ]
        raise DataError(
            f"too few {what} scans: {'; '.join(parts)}; every class needs at least {min_per_class} "
            f"(adapt.min_per_class). Add readable scans to those classes"
        )
    x = torch.from_numpy(np.stack(xs)) if xs else torch.empty(0)
    return LabelledSet(
        classes=list(classes),
        x=x,
        y=torch.tensor(ys, dtype=torch.int64),
        keys=keys,
        rejected=rejected,
    )
