"""labels.csv in the style of NIH ChestX-ray14's Data_Entry_2017.csv.

Columns: Image Index (== the DICOM file's basename; for CT, the series folder's name), Finding Labels
("A|B" or "No Finding"), Follow-up #, Patient ID (the DICOM PatientID), Patient Age (years),
Patient Gender (M/F), View Position (PA/AP; empty for CT), and NIH's OriginalImage[Width / Height] and
OriginalImagePixelSpacing[x / y] columns (NIH's header really splits those names at the comma).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline import atomic
from pipeline.demodata.plan import ImagePlan

COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)


def label_row(im: ImagePlan, width: int, height: int, spacing: float) -> dict[str, object]:
    ident = im.patient.identity
    return {
        "Image Index": im.image_index,
        "Finding Labels": im.finding_labels,
        "Follow-up #": im.follow_up,
        "Patient ID": ident.patient_id,
        "Patient Age": im.age,
        "Patient Gender": ident.sex,
        "View Position": im.view,
        "OriginalImage[Width": width,
        "Height]": height,
        "OriginalImagePixelSpacing[x": spacing,
        "y]": spacing,
    }


def write_labels(path: Path, rows: list[dict[str, object]]) -> None:
    """Write atomically: a reader never sees half a label file."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic.write_text(path, buf.getvalue())
