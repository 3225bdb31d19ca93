"""Geometry and intensity steps of ingest's preprocessing: channels, resize, pad, normalise.

Preprocessing happens once, at ingest, in the decode workers (pipeline/ingest/worker.py); adapt/predict
reach the same steps through `pipeline.ingest.reading.load_for_model`, which gives a new file exactly the
array the store would hold for it. This module imports nothing else of ingest, so the import graph runs
one way: reading -> worker -> preprocess.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from pipeline.errors import DataError

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
