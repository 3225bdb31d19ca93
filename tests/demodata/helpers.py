"""Reading the generated DICOM back the way an ingest would (modality LUT, MONOCHROME1 inversion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.pixels import apply_modality_lut


def read_labels(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "labels.csv", dtype={"Patient ID": str})


def display_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Rescaled values, MONOCHROME1 inverted, so that bright = dense for every vendor."""
    x = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        x = -x
    return x


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
