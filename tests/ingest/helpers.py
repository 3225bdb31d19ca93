"""A tiny NIH-style study (fake identities only) and a manifest for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.ingest.manifest import IngestConfig
from tests.ingest.conftest import make_dicom

FAKE_PIDS = [f"FAKEPID{i:04d}" for i in range(5)]
FAKE_SUBJECT_DIRS = [f"Fakename_{i}" for i in range(5)]  # folder names that "hold a patient name"


def make_study(root: Path, n: int = 12, seed: int = 0) -> dict[str, Any]:
    """n DICOM files under <root>/dicom/<patient folder>/..., labels.csv keyed by base name, plus junk."""
    rng = np.random.default_rng(seed)
    rows = ["Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender"]
    files = []
    for i in range(n):
        pid = i % len(FAKE_PIDS)
        name = f"{i:08d}_000" + (".dcm" if i % 2 else "")
        p = make_dicom(
            root / "dicom" / FAKE_SUBJECT_DIRS[pid] / f"S{i % 2}" / name,
            rng.integers(0, 4000, (24, 30), dtype=np.uint16),
            patient_id=FAKE_PIDS[pid],
            WindowCenter=2000,
            WindowWidth=4000,
            photometric="MONOCHROME1" if i % 3 == 0 else "MONOCHROME2",
            compress_rle=i % 4 == 1,
        )
        files.append(p)
        labels = ["No Finding", "Mass", "Effusion|Mass", "Nodule"][i % 4]
        rows.append(f"{name},{labels},{FAKE_PIDS[pid]},{41 + i},{'MF'[i % 2]}")
    rows.append("99999999_000.dcm,Mass,FAKEPID0000,50,F")  # label for a missing file
    (root / "dicom" / "junk").mkdir(parents=True)
    (root / "dicom" / "junk" / "readme.txt").write_text("export log")
    trunc = root / "dicom" / "junk" / "truncated.dcm"
    trunc.write_bytes(files[0].read_bytes()[:-400])
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"files": files}


def manifest(root: Path, **over: Any) -> IngestConfig:
    data: dict[str, Any] = {
        "name": "tiny",
        "scans": {"root": str(root / "dicom")},
        "labels": {
            "path": str(root / "labels.csv"),
            "key_column": "Image Index",
            "label_column": "Finding Labels",
            "patient_column": "Patient ID",
            "age_column": "Patient Age",
            "sex_column": "Patient Gender",
        },
        "preprocess": {"image_size": [16, 16]},
        "workers": 1,
    }
    for k, v in over.items():
        if isinstance(v, dict):
            data[k] = {**data.get(k, {}), **v}
        else:
            data[k] = v
    return IngestConfig.model_validate(data)
