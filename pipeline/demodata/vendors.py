"""Simulated acquisition vendors: detector, processing and encoding differences between sites.

The renderer produces a vendor-neutral attenuation map (bright = dense). Each vendor turns it into
stored pixel values its own way, the way real exports differ: quantum noise level, edge enhancement
("unsharp masking"), the contrast curve (gamma or sigmoid look-up), bit depth, MONOCHROME1 (inverted)
vs MONOCHROME2, rescale slope/intercept, window centre/width, RLE compression and VR encoding. Ingest has
to undo all of this (modality LUT, MONOCHROME1 inversion) to make images comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Vendor:
    key: str
    manufacturer: str
    model: str
    software: str
    photometric: str  # MONOCHROME1 (white = low value... inverted) or MONOCHROME2
    bits_stored: int  # 12..16, always 16 allocated, unsigned
    slope: float
    intercept: float
    noise: float  # quantum noise std, relative to the full range
    gamma: float  # contrast curve exponent (used when sigmoid_gain == 0)
    sigmoid_gain: float  # > 0: sigmoid look-up table instead of gamma
    unsharp: float  # edge-enhancement strength
    rle_fraction: float  # share of this vendor's files written RLE Lossless
    implicit_vr: bool  # Implicit VR Little Endian instead of Explicit
    detector_mm: float  # field of view across the image, sets PixelSpacing
    naming: str  # "nih": 00001234_002.dcm, "seq": I0001234 (no extension)
    weight: float  # share of patients whose home site uses this vendor


VENDORS: tuple[Vendor, ...] = (
    Vendor("northwind", "Northwind Imaging", "NW-DR 9000", "NWX 4.2.1", "MONOCHROME2", 12, 1.0, 0.0,
           0.012, 1.0, 0.0, 0.3, 0.0, False, 430.0, "nih", 0.35),
    Vendor("halcyon", "Halcyon Medical", "HX CR-350", "CRP 2.07", "MONOCHROME1", 14, 1.0, 0.0,
           0.022, 0.8, 0.0, 0.6, 0.0, True, 350.0, "seq", 0.25),
    Vendor("meridian", "Meridian Radiography", "MR-Flat 43", "MRF-OS 11.3", "MONOCHROME2", 16, 0.25, -512.0,
           0.008, 1.0, 4.0, 0.15, 1.0, False, 400.0, "nih", 0.2),
    Vendor("kestrel", "Kestrel Systems", "KDR Pro 2", "KS 7.0.12", "MONOCHROME1", 15, 2.0, 100.0,
           0.016, 1.3, 0.0, 0.4, 0.35, False, 380.0, "seq", 0.2),
)  # fmt: skip
VENDOR_BY_KEY = {v.key: v for v in VENDORS}

# Attenuation maps from `anatomy` span roughly 0 (air) .. 1.6 (dense mediastinum + bone).
ATT_FULL_SCALE = 1.6


def encode(att: np.ndarray, vendor: Vendor, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Attenuation (H, W) float -> (stored uint16 (H, W), header values for this image)."""
    size = att.shape[0]
    x = att.astype(np.float32) / ATT_FULL_SCALE
    # Exposure and processing drift between acquisitions of the same vendor.
    x = x * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.normal(0.0, 0.03))
    # Quantum noise: fewer photons behind dense tissue -> more noise there; slight detector blur.
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=0.6 * size / 256) * np.float32(1.4)
    x = x + np.float32(vendor.noise) * (0.6 + 0.8 * np.clip(x, 0, 1)) * noise
    if vendor.unsharp > 0:
        blur = ndimage.gaussian_filter(x, sigma=size / 48, truncate=2.5)
        x = x + np.float32(vendor.unsharp) * (x - blur)
    x = np.clip(x, 0.0, 1.0)
    if vendor.sigmoid_gain > 0:
        g = vendor.sigmoid_gain
        lo, hi = 1 / (1 + np.exp(g * 0.5)), 1 / (1 + np.exp(-g * 0.5))
        y = (1 / (1 + np.exp(-g * (x - 0.5))) - lo) / (hi - lo)
    else:
        y = x**vendor.gamma
    maxv = (1 << vendor.bits_stored) - 1
    span = rng.uniform(0.8, 0.97) * maxv
    base = rng.uniform(0.0, 0.02) * maxv
    stored = np.rint(np.clip(y * span + base, 0, maxv)).astype(np.uint16)
    if vendor.photometric == "MONOCHROME1":
        stored = (maxv - stored).astype(np.uint16)
    real = stored.astype(np.float64) * vendor.slope + vendor.intercept
    c = size // 8
    lo_v, hi_v = np.percentile(real[c:-c, c:-c], [1.0, 99.5])
    header = {
        "PhotometricInterpretation": vendor.photometric,
        "BitsStored": vendor.bits_stored,
        "RescaleSlope": vendor.slope,
        "RescaleIntercept": vendor.intercept,
        "WindowCenter": round(float(lo_v + hi_v) / 2, 1),
        "WindowWidth": round(max(float(hi_v - lo_v), 1.0), 1),
    }
    return stored, header
