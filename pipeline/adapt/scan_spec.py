"""What an adapted meta-model expects of every scan (`ScanSpec`), and the checks that say why a scan does
not fit it: another modality, a 2-D image for a 3-D model (or the reverse), another geometry, NaN/inf."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError


class ScanMismatch(DataError):
    """A readable scan that does not fit the meta-model (other modality, channels or spatial dims)."""


@dataclass(frozen=True)
class ScanSpec:
    """What the meta-model expects of every scan: ingest's preprocessing and the resulting geometry."""

    preprocessing: dict[str, Any]
    shape: tuple[int, ...]  # (C, H, W) or (C, D, H, W), as stored by ingest
    modalities: frozenset[str] | None = None  # DICOM modalities seen at ingest (None: not checked)

    @property
    def volumetric(self) -> bool:
        """True for a 3D meta-model: its scans are (C, D, H, W) volumes."""
        return len(self.shape) == 4

    def to_json(self) -> dict[str, Any]:
        return {
            "preprocessing": self.preprocessing,
            "shape": list(self.shape),
            "modalities": sorted(self.modalities) if self.modalities is not None else None,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> ScanSpec:
        mods = d.get("modalities")
        return ScanSpec(
            preprocessing=dict(d["preprocessing"]),
            shape=tuple(int(s) for s in d["shape"]),
            modalities=frozenset(mods) if mods is not None else None,
        )


def dicom_modality(path: Path) -> str | None:
    """The DICOM Modality of a file, or None when it is not DICOM (PNG, NIfTI, ...) or has none."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
        return None
    mod = str(getattr(ds, "Modality", "") or "").strip().upper()
    return mod or None


def _describe_shape(shape: tuple[int, ...]) -> str:
    kind = {3: "2-D", 4: "3-D"}.get(len(shape), f"{len(shape) - 1}-D")
    return f"{kind}, {shape[0]} channel(s), {'x'.join(str(s) for s in shape[1:])}"


def dims_mismatch(spec: ScanSpec) -> ScanMismatch:
    """A 2-D image for a 3-D model or a volume for a 2-D one: the set is wrong, not the file."""
    if spec.volumetric:
        return ScanMismatch(
            f"a 2-D image, but the meta-model takes 3-D volumes ({_describe_shape(spec.shape)}): give one "
            "DICOM series folder (all slices of one scan) or one NIfTI volume per scan, or adapt a "
            "meta-model trained on 2-D images"
        )
    return ScanMismatch(
        f"a 3-D volume, but the meta-model takes 2-D images ({_describe_shape(spec.shape)}): give 2-D "
        "scans, or adapt a meta-model trained on 3-D volumes"
    )


def check_array(arr: Any, spec: ScanSpec, *, caller_array: bool = False) -> np.ndarray:
    """An array as the model takes it (shape `spec.shape`, finite) -> float32; else ScanMismatch (shape)
    or DataError (NaN/inf). `caller_array`: the array came preprocessed from the caller (serving), not
    from our own preprocessing, and the messages say what to send instead."""
    arr = np.asarray(arr, dtype=np.float32)
    if tuple(arr.shape) != spec.shape:
        got = _describe_shape(tuple(arr.shape)) if arr.ndim >= 2 else f"shape {tuple(arr.shape)}"
        if caller_array:
            raise ScanMismatch(
                f"an input array has shape {tuple(arr.shape)} ({got}), but the meta-model takes "
                f"{_describe_shape(spec.shape)}, shape {spec.shape}: arrays "
                "must already be preprocessed like the meta-model's store (send the DICOM file or its "
                "bytes otherwise)"
            )
        raise ScanMismatch(f"preprocessed to {got}, but the meta-model takes {_describe_shape(spec.shape)}")
    if not np.all(np.isfinite(arr)):
        if caller_array:
            raise DataError("an input array holds NaN or inf")
        raise DataError("preprocessing produced non-finite values (NaN/inf): the pixel data is corrupt")
    return arr


def check_modality(mod: str | None, spec: ScanSpec) -> None:
    if spec.modalities and mod is not None and mod not in spec.modalities:
        raise ScanMismatch(
            f"modality {mod}, but the meta-model was trained on {', '.join(sorted(spec.modalities))}"
        )
