"""Geometry and intensity steps shared by ingest and by adapt/predict (`load_for_model`).

Preprocessing happens once, at ingest; adapt/predict call `load_for_model` on a new file with the
store's `preprocessing` dict and get exactly the array the store would hold for it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, ScanRejectedError

PREPROCESS_VERSION = 2  # bump when a change alters stored pixels: invalidates the decode cache
# 2: Presentation LUT Shape INVERSE applied; constant and too small images rejected


def prep_digest(prep: dict[str, Any]) -> str:
    blob = json.dumps({"v": PREPROCESS_VERSION, **prep}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(C, ...) -> (channels, ...): RGB to luminance (ITU-R BT.601) or grey repeated to 3 channels."""
    c = img.shape[0]
    if c == channels:
        return img
    if channels == 1 and c >= 3:
        w = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape((3,) + (1,) * (img.ndim - 1))
        return (img[:3] * w).sum(axis=0, keepdims=True).astype(np.float32)
    if channels == 3 and c == 1:
        return np.repeat(img, 3, axis=0)
    raise DataError(f"cannot turn a {c}-channel image into {channels} channels")


def fit_size(shape: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...]:
    """The largest shape with the input's aspect ratio that fits inside `size`."""
    scale = min(t / s for t, s in zip(size, shape))
    return tuple(max(1, min(t, int(round(s * scale)))) for s, t in zip(shape, size))


def pad_center(img: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Zero-pad (C, *spatial) to (C, *size), centred (extra pixel after); crops if larger."""
    out = np.zeros((img.shape[0], *size), dtype=img.dtype)
    src, dst = [slice(None)], [slice(None)]
    for n, t in zip(img.shape[1:], size):
        if n <= t:
            a = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
        else:
            a = (n - t) // 2
            src.append(slice(a, a + t))
            dst.append(slice(0, t))
    out[tuple(dst)] = img[tuple(src)]
    return out


def resize_2d(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) float32 -> (C, *size): aspect-preserving resize (antialiased bilinear), zero padding.

    Pillow's float ("F") resampling filters with a support scaled to the reduction factor, so strong
    downsampling averages rather than aliases; it is also ~10x faster per image than torch here.
    """
    from PIL import Image

    h, w = img.shape[1:]
    nh, nw = fit_size((h, w), size)
    if (nh, nw) == (h, w):
        resized = img
    else:
        chans = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32), mode="F").resize(
                    (nw, nh), Image.Resampling.BILINEAR
                )
            )
            for ch in img
        ]
        resized = np.stack(chans)
    return pad_center(resized.astype(np.float32, copy=False), size)


def resize_3d(
    vol: np.ndarray,
    spacing: tuple[float, float, float],
    size: tuple[int, int, int],
    target_spacing: list[float] | None,
) -> np.ndarray:
    """(C, D, H, W) with voxel `spacing` (z, y, x) mm -> (C, *size) with MONAI.

    With `target_spacing`, the volume is first resampled to that spacing (physical size kept; trilinear,
    antialiased when shrinking) and then centre-cropped/padded to `size`. Without it, it is scaled
    isotropically in physical units to fit `size` and padded, which keeps anatomy proportions.
    """
    import torch
    from monai.transforms import Resize, ResizeWithPadOrCrop

    torch.set_num_threads(1)  # one decode process per core already; nested threads only thrash
    shape = vol.shape[1:]
    if target_spacing is not None:
        new = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))
    else:
        phys = tuple(n * s for n, s in zip(shape, spacing))
        scale = min(t / p for t, p in zip(size, phys))
        new = tuple(max(1, min(t, int(round(p * scale)))) for p, t in zip(phys, size))
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))
    if new != tuple(shape):
        t = Resize(spatial_size=new, mode="trilinear", anti_aliasing=True)(t)
    t = ResizeWithPadOrCrop(spatial_size=size, mode="constant")(t)
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, dtype=np.float32)


def normalize(img: np.ndarray, how: str) -> np.ndarray:
    """Per-image only (no dataset statistics), so a single scan is preprocessed identically at predict."""
    if how == "zscore":
        m, s = float(img.mean()), float(img.std())
        return ((img - m) / (s if s > 1e-6 else 1.0)).astype(np.float32)
    return img.astype(np.float32, copy=False)


def finish_2d(img: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """(C, H, W) in [0, 1] -> stored (channels, *image_size) float16."""
    x = to_channels(img, int(prep["channels"]))
    x = resize_2d(x, tuple(prep["image_size"]))  # type: ignore[arg-type]
    return normalize(x, prep["normalize"]).astype(np.float16)


def finish_3d(vol: np.ndarray, spacing: tuple[float, float, float], prep: dict[str, Any]) -> np.ndarray:
    x = to_channels(vol, int(prep["channels"]))
    x = resize_3d(x, spacing, tuple(prep["image_size"]), prep.get("spacing"))  # type: ignore[arg-type]
    return normalize(x, prep["normalize"]).astype(np.float16)


def load_for_model(path: Path, preprocessing: dict[str, Any]) -> np.ndarray:
    """ONE scan (a DICOM/NIfTI/PNG/JPEG file, or a folder holding one DICOM series for 3D) -> exactly the
    array ingest stores for it, as float32: (C, H, W) for 2D, (C, D, H, W) for 3D.

    Raises DataError naming the reason when the file is unreadable or holds more than one image
    (ScanRejectedError, carrying ingest's reason code, when ingest itself would reject it).
    """
    p = Path(path)
    prep = dict(preprocessing)
    # pydicom's warnings quote header values (UIDs, ids): never printed, as in ingest (docs/ingest.md)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_for_model(p, prep)


def _load_for_model(p: Path, prep: dict[str, Any]) -> np.ndarray:
    from pipeline.ingest.discover import sniff
    from pipeline.ingest.reasons import Rejected
    from pipeline.ingest.worker import decode_file, decode_series_paths

    try:
        if p.is_dir():
            if int(prep["spatial_dims"]) != 3:
                raise DataError(f"{p.name} is a folder; only a 3D store takes a DICOM series folder")
            arr = decode_series_paths(
                sorted(q for q in p.rglob("*") if q.is_file() and sniff(q) == "dicom"), prep
            )
            return arr.astype(np.float32)
        if not p.is_file():
            raise DataError(f"scan file {p} does not exist")
        fmt = sniff(p)
        if fmt == "unknown":
            raise DataError(f"{p.name}: unreadable (not a DICOM, NIfTI, PNG or JPEG file)")
        if fmt == "npz":
            raise DataError(f"{p.name}: an npz holds many images; pass one image file")
        items = decode_file(p, fmt, p.read_bytes(), prep)
    except Rejected as r:
        raise ScanRejectedError(f"{p.name}: {r.reason}: {r.detail}", r.reason) from None
    if len(items) != 1:
        raise DataError(
            f"{p.name} holds {len(items)} images (multi-frame); pass a single-frame file or use preprocessing multiframe=first"
        )
    return items[0][0].astype(np.float32)
