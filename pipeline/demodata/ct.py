"""The CT variant: one axial chest series per labelled study, lesions in 3D.

Each planned "image" becomes a series folder of single-slice CT Image Storage files with a consistent
geometry (ImageOrientationPatient axial, ImagePositionPatient stepping by SpacingBetweenSlices along z,
PixelSpacing, SliceThickness), so that ingest has to sort slices by position (file names and instance
numbers do not follow z for every vendor) and stack them into a volume. labels.csv has one row per
series; its Image Index is the series folder's name.

Volumes are (D, H, W) with D = max(8, size // 4) slices, in Hounsfield units before the vendor's
rescale; findings are 3D (spheres, dependent fluid, non-dependent air, ground glass, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.demodata.dicomio import CT_IMAGE, base_dataset, finish_and_write, set_pixels, uid
from pipeline.demodata.plan import ImagePlan
from pipeline.demodata.prevalence import FINDINGS
from pipeline.demodata.render import STREAM_FINDING, STREAM_IMAGE, STREAM_PATIENT


@dataclass(frozen=True)
class CTVendor:
    key: str
    manufacturer: str
    model: str
    software: str
    signed: bool  # signed int16, intercept 0 / unsigned 12-bit, intercept -1024
    intercept: float
    bits_stored: int
    noise_hu: float
    rle_fraction: float
    ascending: bool  # instance 1 = most inferior slice (else most superior)
    naming: str  # "im": IM0001.dcm by instance; "uid": hashed names (no z order)
    weight: float


CT_VENDORS: tuple[CTVendor, ...] = (
    CTVendor("northwind-ct", "Northwind Imaging", "NW-CT 64", "NWC 3.1", True, 0.0, 16, 12.0, 0.0, True, "im", 0.5),
    CTVendor("halcyon-ct", "Halcyon Medical", "HX Aurora 128", "AUR 9.2", False, -1024.0, 12, 20.0, 0.5, False,
             "uid", 0.5),
)  # fmt: skip

FOV_MM = 360.0
Z_MM = 240.0  # apex to below the domes


def depth_for(size: int) -> int:
    return max(8, size // 4)


def render_volume(seed: int, patient: int, image: int, labels: tuple[str, ...], size: int) -> np.ndarray:
    """(D, H, W) float32 Hounsfield units. x: patient right->left (columns), y: anterior->posterior
    (rows), z: inferior->superior (slice index)."""
    d = depth_for(size)
    pr = np.random.default_rng([seed, STREAM_PATIENT, patient])
    g = np.random.default_rng([seed, STREAM_IMAGE, image])
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    zc = (np.arange(d, dtype=np.float32) + 0.5) / d  # 0 = inferior, 1 = apex
    z, y, x = np.meshgrid(zc, c, c, indexing="ij")
    a, b = pr.uniform(0.78, 0.9), pr.uniform(0.55, 0.65)
    ex = x - g.normal(0, 0.02)
    ey = y - g.normal(0, 0.02)
    body_r = (ex / a) ** 2 + (ey / b) ** 2
    vol = np.where(body_r < 1, 40.0, -1000.0).astype(np.float32)
    vol[(body_r < 1) & (body_r > 0.86)] = -100.0  # subcutaneous fat
    dome = pr.uniform(0.2, 0.3) + g.normal(0, 0.02)
    heart_scale = pr.uniform(0.9, 1.05)
    p = {"dome": dome, "heart": heart_scale, "air": -850.0, "vessels": 1.0}
    if "Cardiomegaly" in labels:
        p["heart"] *= 1.35
    if "Emphysema" in labels:
        p["dome"] -= 0.08
        p["air"] = -900.0
        p["vessels"] = 0.5
    lungs = {}
    for side in (-1, 1):
        lx = side * pr.uniform(0.36, 0.42)
        taper = np.sqrt(np.clip((1.0 - z) / 0.35, 0.15, 1.0))  # narrower at the apex
        r = ((ex - lx) / (0.3 * taper)) ** 2 + ((ey - 0.02) / (0.42 * taper)) ** 2
        floor = p["dome"] + 0.25 * np.clip(1 - ((ex - lx) ** 2 + ey**2) / 0.2, 0, 1)  # dome rises centrally
        lungs[side] = (r < 1) & (z > floor) & (z < 0.97)
    lung = lungs[-1] | lungs[1]
    tex = ndimage.gaussian_filter(g.standard_normal(vol.shape, dtype=np.float32), 0.8)
    vessels = (tex > 2.0 - 0.3 * (1 - p["vessels"])) if p["vessels"] >= 1 else (tex > 2.3)
    vol[lung] = p["air"] + 25 * tex[lung]
    vol[lung & vessels] = 40.0
    hz = p["dome"] + 0.15
    hr = (
        ((ex - 0.1) / (0.28 * p["heart"])) ** 2
        + ((ey + 0.12) / (0.24 * p["heart"])) ** 2
        + ((z - hz) / 0.22) ** 2
    )
    vol[hr < 1] = 40.0
    vol[((ex - 0.05) ** 2 + (ey - 0.18) ** 2 < 0.06**2) & (z > hz)] = 45.0  # descending aorta
    spine = (ex**2 + (ey - 0.42) ** 2) < 0.1**2
    vol[spine] = 300.0
    vol[spine & ((ex**2 + (ey - 0.42) ** 2) > 0.085**2)] = 800.0
    ring = (body_r > 0.74) & (body_r < 0.8) & (np.cos(2 * np.pi * z * 6 + ey * 3) > 0.6)
    vol[ring] = 700.0  # rib arcs
    vol[(z < p["dome"]) & (body_r < 0.86) & ~spine] = 55.0  # liver / upper abdomen
    for lab in labels:
        f = np.random.default_rng([seed, STREAM_FINDING, patient, FINDINGS.index(lab)])
        _finding_3d(lab, vol, lungs, x=ex, y=ey, z=z, f=f, g=g, p=p)
    vol += g.normal(0, 1, vol.shape).astype(np.float32) * np.float32(8.0)
    return vol


def _sphere(x, y, z, c, r, zr=None):
    return ((x - c[0]) ** 2 + (y - c[1]) ** 2) / r**2 + (z - c[2]) ** 2 / (zr or r) ** 2 < 1


def _lung_point(lungs, side, f):
    idx = np.argwhere(lungs[side])
    if len(idx) == 0:
        return None
    return idx[int(f.integers(len(idx)))]


def _finding_3d(lab, vol, lungs, *, x, y, z, f, g, p):
    side = int((-1, 1)[int(f.integers(2))])
    lung = lungs[side]
    both = lungs[-1] | lungs[1]
    d, h, w = vol.shape
    pt = _lung_point(lungs, side, f)
    if pt is None:
        return
    c = (x[tuple(pt)], y[tuple(pt)], z[tuple(pt)])
    smooth = ndimage.gaussian_filter(f.standard_normal(vol.shape, dtype=np.float32), 2.0)
    smooth /= smooth.std() + 1e-6
    if lab == "Nodule":
        m = _sphere(x, y, z, c, f.uniform(0.03, 0.06) * g.uniform(0.9, 1.1), 0.08)
        vol[m & both] = f.uniform(-20, 60)
    elif lab == "Mass":
        r = f.uniform(0.08, 0.14)
        m = _sphere(x, y, z, c, r, 1.5 * r) | _sphere(x, y, z, (c[0] + r / 2, c[1], c[2]), 0.7 * r, r)
        vol[m & both] = f.uniform(20, 60)
    elif lab == "Effusion":  # dependent (posterior) fluid, supine
        level = f.uniform(0.1, 0.35) * g.uniform(0.85, 1.15)
        vol[lung & (y > 0.42 - level)] = 12.0
    elif lab == "Pneumothorax":  # non-dependent (anterior) air without lung markings
        level = f.uniform(0.06, 0.2) * g.uniform(0.85, 1.15)
        vol[lung & (y < -0.4 + level)] = -1000.0
    elif lab == "Consolidation":
        m = lung & (z < c[2] + 0.1) & (smooth > -0.5) & (y > 0.0)
        vol[m] = 35.0
        vol[m & (np.abs(smooth) < 0.08)] = -900.0  # air bronchograms
    elif lab == "Pneumonia":
        vol[lung & (smooth > 1.0) & (z < 0.6)] = f.uniform(-150, 20)
    elif lab == "Infiltration":
        vol[both & (smooth > 0.6)] = f.uniform(-650, -500)
    elif lab == "Edema":
        peri = ((np.abs(x) - 0.25) ** 2 + y**2) < 0.2**2
        vol[both & (peri | (smooth > 1.2))] = f.uniform(-600, -450)
    elif lab == "Atelectasis":
        vol[lung & (y > 0.3) & (z < p["dome"] + 0.25)] = 20.0
    elif lab == "Emphysema":
        vol[both & (smooth > 0.8)] = -960.0
    elif lab == "Fibrosis":
        periph = ndimage.binary_erosion(both, iterations=max(1, w // 32)) ^ both
        net = np.abs(ndimage.gaussian_filter(f.standard_normal(vol.shape, dtype=np.float32), 0.8)) < 0.25
        vol[periph & net & (z < 0.6)] = -250.0
    elif lab == "Pleural_Thickening":
        rim = ndimage.binary_erosion(lung, iterations=max(1, w // 64)) ^ lung
        vol[rim & (z > f.uniform(0.3, 0.6))] = 30.0
    elif lab == "Hernia":  # retrocardiac, just above the hiatus; air anteriorly, fluid dependent
        r = f.uniform(0.07, 0.11)
        m = _sphere(x, y, z, (0.03, 0.25, p["dome"] + 0.05), r, 0.1)
        vol[m] = 25.0
        vol[m & (y < 0.25 - 0.3 * r)] = -1000.0


def write_series(seed: int, im: ImagePlan, size: int, folder: Path) -> dict:
    """Render the planned series and write one file per slice; returns what was written."""
    vendor = CT_VENDORS[im.vendor]
    vol = render_volume(seed, im.patient.index, im.index, im.labels, size)
    d = vol.shape[0]
    if vendor.signed:
        stored = np.clip(np.rint(vol - vendor.intercept), -2048, 3071).astype(np.int16)
    else:
        stored = np.clip(np.rint(vol - vendor.intercept), 0, (1 << vendor.bits_stored) - 1).astype(np.uint16)
    spacing = round(FOV_MM / size, 4)
    dz = round(Z_MM / d, 3)
    z0 = -Z_MM / 2 + dz / 2
    order = list(range(d)) if vendor.ascending else list(range(d))[::-1]
    for inst, k in enumerate(order, start=1):
        ds = base_dataset(
            seed, im, "CT", CT_IMAGE, vendor.manufacturer, vendor.model, vendor.software, "CT01"
        )
        ds.SOPInstanceUID = uid(seed, "ct-sop", im.index, k)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
        ds.SeriesDescription = "AXIAL 5MM LUNG"
        ds.InstanceNumber = inst
        ds.FrameOfReferenceUID = uid(seed, "for", im.index)
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [
            -FOV_MM / 2 + spacing / 2,
            -FOV_MM / 2 + spacing / 2,
            round(z0 + k * dz, 3),
        ]
        ds.SliceLocation = round(z0 + k * dz, 3)
        ds.SliceThickness = dz
        ds.SpacingBetweenSlices = dz
        ds.PixelSpacing = [spacing, spacing]
        ds.KVP = 120
        ds.PhotometricInterpretation = "MONOCHROME2"
        set_pixels(ds, stored[k], vendor.bits_stored, signed=vendor.signed)
        ds.RescaleIntercept = vendor.intercept
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
        ds.WindowCenter = [-600, 40]
        ds.WindowWidth = [1500, 400]
        name = (
            f"IM{inst:04d}.dcm"
            if vendor.naming == "im"
            else f"{int(ds.SOPInstanceUID.split('.')[-1]) % 10**10:010d}"
        )
        finish_and_write(ds, folder / name, rle=im.rle, implicit=False)
    return {"files": d, "spacing": spacing, "vendor": vendor.key, "photometric": "MONOCHROME2",
            "bits": vendor.bits_stored, "rle": d * int(im.rle)}  # fmt: skip
