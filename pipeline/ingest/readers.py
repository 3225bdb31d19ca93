"""Readers for the non-DICOM formats: NIfTI (nibabel), PNG/JPEG (Pillow), MedMNIST npz.

Each returns float32 intensities in [0, 1] with channels first, plus PHI-free facts for the index.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.ingest import reasons as R
from pipeline.ingest.dicom_read import minmax, window_linear
from pipeline.ingest.reasons import Rejected


def read_nifti(
    path: Path, voi: str, window: dict[str, float] | None
) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    """A NIfTI image as (C=1, D, H, W) (3D) or (1, H, W) (2D) in [0, 1], its (D,H,W) spacing, raw shape.

    Reoriented to the closest canonical (RAS+) orientation and transposed so that axis 0 runs
    inferior->superior and rows run anterior->posterior: every volume in the store has the same layout.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise Rejected(R.UNREADABLE, f"not a readable NIfTI file ({type(e).__name__})") from None
    raw_shape = tuple(int(s) for s in data.shape)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise Rejected(
            R.WRONG_DIMENSIONALITY,
            f"4D NIfTI {raw_shape} (time series) is not supported; split it per volume",
        )
    if data.ndim == 2:
        data = data[:, :, None]
        zooms = (*zooms[:2], 1.0) if len(zooms) >= 2 else (1.0, 1.0, 1.0)
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    # (x, y, z) RAS -> (z, y, x), then flip y so that anterior is the first row
    vol = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, :])
    if voi == "manifest" and window is not None:
        vol = window_linear(vol, float(window["center"]), float(window["width"]))
    else:
        vol = minmax(vol)
    zyx = (zooms[2], zooms[1], zooms[0]) if len(zooms) == 3 else (1.0, 1.0, 1.0)
    return vol[None], zyx, raw_shape


def read_raster(data: bytes) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """PNG/JPEG bytes as (C, H, W) in [0, 1], scaled by bit depth (8 or 16 bit), and the PIL mode."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise Rejected(R.UNREADABLE, f"not a readable PNG/JPEG image ({type(e).__name__})") from None
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if mode != "I" or arr.max() > 255 else 255.0
        x = np.clip(arr / top, 0, 1)[None]
    elif mode == "F":
        x = minmax(np.asarray(im, dtype=np.float32))[None]
    elif mode in ("L", "1", "LA"):
        x = (np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None]
    else:  # RGB, RGBA, P, CMYK, YCbCr
        x = (np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1)
    return np.ascontiguousarray(x), mode, tuple(int(s) for s in np.asarray(im).shape)


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise Rejected(R.UNREADABLE, f"not a readable npz file ({type(e).__name__})") from None


def iter_medmnist(
    arrays: dict[str, np.ndarray], splits: list[str], names: list[str], spatial_dims: int
) -> Iterator[tuple[str, int, np.ndarray, list[str]]]:
    """(split, index, image (C, [D,] H, W) in [0,1], label names) for every image of a MedMNIST npz.

    MedMNIST stores `<split>_images` as uint8 (N, H, W[, 3]) for 2D and (N, D, H, W) for 3D, and
    `<split>_labels` as (N, 1) class indices (single-label) or (N, K) 0/1 (multi-label, e.g. ChestMNIST).
    """
    found = [s for s in splits if f"{s}_images" in arrays]
    if not found:
        raise Rejected(
            R.UNREADABLE,
            f"npz has none of {', '.join(s + '_images' for s in splits)} (keys: {sorted(arrays)[:8]})",
        )
    for split in found:
        imgs = arrays[f"{split}_images"]
        labels = arrays.get(f"{split}_labels")
        if labels is None or len(labels) != len(imgs):
            raise Rejected(R.UNREADABLE, f"npz {split}_labels missing or not one row per image")
        labels = labels.reshape(len(labels), -1)
        multi = labels.shape[1] > 1
        if multi and labels.shape[1] != len(names):
            raise Rejected(
                R.UNREADABLE,
                f"npz {split}_labels has {labels.shape[1]} columns but labels.names has {len(names)}",
            )
        ndim_img = imgs.ndim - 1
        scale = 255.0 if imgs.dtype == np.uint8 else (65535.0 if imgs.dtype == np.uint16 else None)
        for i in range(len(imgs)):
            a = imgs[i].astype(np.float32)
            a = a / scale if scale else minmax(a)
            if spatial_dims == 2:
                if ndim_img == 2:
                    x = a[None]
                elif ndim_img == 3 and a.shape[-1] in (3, 4):
                    x = a[..., :3].transpose(2, 0, 1)
                else:
                    raise Rejected(
                        R.WRONG_DIMENSIONALITY,
                        f"npz images of shape {imgs.shape[1:]} are 3D; set preprocess.spatial_dims: 3",
                    )
            else:
                if ndim_img == 3 and a.shape[-1] not in (3, 4):
                    x = a[None]
                elif ndim_img == 4 and a.shape[-1] == 1:
                    x = a[..., 0][None]
                else:
                    raise Rejected(
                        R.WRONG_DIMENSIONALITY,
                        f"npz images of shape {imgs.shape[1:]} are 2D; set preprocess.spatial_dims: 2",
                    )
            if multi:
                labs = [names[j] for j in np.flatnonzero(labels[i])]
            else:
                j = int(labels[i, 0])
                if not 0 <= j < len(names):
                    raise Rejected(
                        R.UNREADABLE,
                        f"npz {split}_labels holds class {j}; labels.names has {len(names)} names",
                    )
                labs = [names[j]]
            yield split, i, np.ascontiguousarray(x), labs
