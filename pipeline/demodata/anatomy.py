"""Chest anatomy for a frontal radiograph, rendered as an attenuation map (bright = dense).

Coordinates: the image spans [-1, 1] in both axes; anatomy lives in patient coordinates (u, v) that
the grid maps into with a per-visit rotation, scale and shift (positioning). u > 0 is the image right,
which on a frontal chest film is the patient's LEFT (heart side); v grows downwards. `side` is -1 for the
patient's right lung (image left) and +1 for the left lung; `uu = side * u` is the lateral distance.

Per patient (stable over follow-ups): habitus, lung size, heart size and shape, rib geometry, vessel
tree. Per visit: inspiration, rotation, shift, AP vs PA (AP: magnified heart, scapulae over the lungs,
shallower inspiration). Findings (`findings.py`) edit the parameters before rendering (cardiomegaly,
hyperinflation, volume loss) and the layers after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

SIDES = (-1, 1)


def sig(x: np.ndarray) -> np.ndarray:
    """Smooth step; float32 in, float32 out."""
    return (0.5 + 0.5 * np.tanh(0.5 * x)).astype(np.float32)


def patient_params(rng: np.random.Generator) -> dict:
    """Anatomy of one patient, stable over all of their images."""
    body_hw = rng.uniform(0.78, 0.9)
    p = {
        "body_hw": body_hw,
        "tissue": rng.uniform(0.85, 1.12),
        "lung_hw": body_hw - rng.uniform(0.08, 0.13),
        "lung_top": rng.uniform(-0.8, -0.68),
        "dome_R": rng.uniform(0.36, 0.5),
        "dome_gap": rng.uniform(0.02, 0.06),  # the left dome sits lower than the right
        "dome_curv": rng.uniform(0.8, 1.1),
        "air": rng.uniform(0.42, 0.52),
        "ctr": rng.uniform(0.40, 0.49),  # cardiothoracic ratio
        "heart_cx": rng.uniform(0.05, 0.1),
        "heart_ry": rng.uniform(0.16, 0.21),
        "heart_tilt": rng.uniform(0.3, 0.6),
        "heart_dens": rng.uniform(0.02, 0.08),
        "medi_hw": rng.uniform(0.085, 0.115),
        "medi_shift": 0.0,
        "rib_v0": rng.uniform(-0.8, -0.72),
        "rib_step": rng.uniform(0.105, 0.125),
        "rib_w": rng.uniform(0.026, 0.034),
        "bone": rng.uniform(0.06, 0.11),
        "breast": rng.uniform(0.06, 0.16) if rng.random() < 0.45 else 0.0,
        "markings": rng.uniform(0.035, 0.06),
        "texture": rng.uniform(0.015, 0.03),
        "bubble": rng.uniform(0.0, 0.25),
        # Vessel tree: per side 8 trunks (angle from lateral, length) and a branch from each midpoint.
        "vessel_angle": rng.uniform(-1.5, 1.3, size=(2, 8)),
        "vessel_len": rng.uniform(0.25, 0.5, size=(2, 8)),
        "branch_angle": rng.choice([-1.0, 1.0], size=(2, 8)) * rng.uniform(0.3, 0.6, size=(2, 8)),
    }
    return p


def visit_params(p: dict, view: str, rng: np.random.Generator) -> dict:
    """This visit's positioning and inspiration on top of the patient's anatomy."""
    q = dict(p)
    ap = view == "AP"
    q["rotation"] = rng.normal(0.0, 0.035)
    q["scale"] = rng.uniform(0.92, 1.04) * (1.04 if ap else 1.0)
    q["shift"] = (rng.normal(0.0, 0.03), rng.normal(0.0, 0.03))
    insp = rng.normal(0.0, 0.03) - (0.05 if ap else 0.0)  # AP portables: shallower inspiration
    q["dome_R"] = p["dome_R"] + insp
    q["heart_mag"] = rng.uniform(1.08, 1.16) if ap else 1.0
    q["scapula"] = rng.uniform(0.05, 0.1) if ap else rng.uniform(0.0, 0.02)
    return q


@dataclass
class Scene:
    """The rendered layers of one image; findings read and edit them."""

    size: int
    u: np.ndarray  # (H, W) patient coordinates of each pixel
    v: np.ndarray
    p: dict
    lung: dict[int, np.ndarray] = field(default_factory=dict)  # side -> visible lung (no heart/mediastinum)
    lung_full: dict[int, np.ndarray] = field(default_factory=dict)  # side -> lung incl. behind the heart
    # Filled by render_anatomy (empty until then):
    heart: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    att: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # without vessel markings
    markings: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # vessels, added last
    marking_gain: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # findings edit this

    def dome(self, side: int, uu: np.ndarray | float) -> np.ndarray:
        d = (
            self.p["dome_R"]
            + (self.p["dome_gap"] if side == 1 else 0.0)
            + self.p.get(f"dome_lift_{side}", 0.0)
        )
        return d + self.p["dome_curv"] * (uu - 0.45 * self.p["lung_hw"]) ** 2

    def med(self) -> float:
        return self.p["medi_hw"] + 0.02

    def lat(self, side: int, v: np.ndarray | float) -> np.ndarray:
        top, bottom = self.p["lung_top"], self.dome(side, 0.45 * self.p["lung_hw"])
        t = np.clip((np.asarray(v) - top) / max(bottom - top, 1e-3), 0.0, 1.0)
        return self.p["lung_hw"] * (0.55 + 0.45 * np.sqrt(t))

    def lung_point(self, side: int, t: float, h: float) -> tuple[float, float]:
        """(u, v) at relative height t (0 apex .. 1 dome) and lateral fraction h (0 medial .. 1 wall)."""
        top = self.p["lung_top"] + 0.04
        bottom = float(self.dome(side, 0.45 * self.p["lung_hw"]))
        v = top + t * (bottom - top)
        med = self.med()
        uu = med + h * (float(self.lat(side, v)) - med)
        return side * uu, v


def make_grid(size: int, q: dict) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres -> patient coordinates (rotation, scale, shift of this visit)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    th, s = q["rotation"], q["scale"]
    tx, ty = q["shift"]
    u = (np.cos(th) * x + np.sin(th) * y - tx) / s
    v = (-np.sin(th) * x + np.cos(th) * y - ty) / s
    return u.astype(np.float32), v.astype(np.float32)


def _rib_family(vr: np.ndarray, step: float, w: float, n: int, hollow: bool) -> np.ndarray:
    """n rib bands along curves where vr == step * k * (1 + 0.03 k) (spaces widen downwards).

    Evaluated through a continuous rib index, so the cost does not grow with the number of ribs.
    """
    k = (np.sqrt(np.maximum(1.0 + 0.12 * vr / step, 0.0)) - 1.0) / 0.06
    kr = np.clip(np.rint(k), 0, n - 1)
    d = (k - kr) * step * (1.0 + 0.06 * kr)  # distance to the nearest rib centre, in v units
    out = _band(d, w)
    if hollow:  # bright cortex, paler medulla
        out = out - 0.45 * _band(d, 0.55 * w)
    return out.astype(np.float32)


def _band(d: np.ndarray, w: float) -> np.ndarray:
    """A flat-topped band of half-width w around d == 0."""
    r = d / w
    return np.exp(-((r * r) ** 2)).astype(np.float32)


def to_pixel(q: dict, size: int, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `make_grid`: patient coordinates -> (row, col) pixel positions."""
    th, s = q["rotation"], q["scale"]
    tx, ty = q["shift"]
    a, b = s * np.asarray(u) + tx, s * np.asarray(v) + ty
    x = np.cos(th) * a - np.sin(th) * b
    y = np.sin(th) * a + np.cos(th) * b
    return (y + 1) / 2 * size - 0.5, (x + 1) / 2 * size - 0.5


def segments(
    u: np.ndarray, v: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: np.ndarray, q: dict
) -> np.ndarray:
    """Sum of tapered line segments p0[i] -> p1[i] ((N, 2) each, width (N,)) as an (H, W) map.

    Each segment is evaluated only inside its pixel bounding box (q: this visit's grid parameters),
    which keeps a vessel tree at a few ms per 256x256 image.
    """
    size = u.shape[0]
    out = np.zeros_like(u)
    p0 = np.asarray(p0, dtype=np.float32)
    p1 = np.asarray(p1, dtype=np.float32)
    width = np.asarray(width, dtype=np.float32)
    r0, c0 = to_pixel(q, size, p0[:, 0], p0[:, 1])
    r1, c1 = to_pixel(q, size, p1[:, 0], p1[:, 1])
    pad = 3.0 * width * size / 2 / q["scale"] + 2
    for i in range(len(p0)):
        ra = max(int(min(r0[i], r1[i]) - pad[i]), 0)
        rb = min(int(max(r0[i], r1[i]) + pad[i]) + 1, size)
        ca = max(int(min(c0[i], c1[i]) - pad[i]), 0)
        cb = min(int(max(c0[i], c1[i]) + pad[i]) + 1, size)
        if ra >= rb or ca >= cb:
            continue
        uu = u[ra:rb, ca:cb] - p0[i, 0]
        vv = v[ra:rb, ca:cb] - p0[i, 1]
        d = p1[i] - p0[i]
        t = np.clip((uu * d[0] + vv * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
        du, dv = uu - t * d[0], vv - t * d[1]
        w = width[i] * (1.0 - 0.7 * t)
        out[ra:rb, ca:cb] += np.exp(-(du * du + dv * dv) / (w * w)) * (1.0 - 0.5 * t)
    return out


def render_anatomy(scene: Scene, rng: np.random.Generator) -> None:
    """Fill scene.att / lung / heart / markings from scene.p (after findings' `prepare`)."""
    u, v, p, size = scene.u, scene.v, scene.p, scene.size
    e = 0.012
    au = np.abs(u)
    body_prof = np.sqrt(np.clip(1.0 - (u / p["body_hw"]) ** 2, 0.0, 1.0)).astype(np.float32)
    body = p["tissue"] * 0.9 * body_prof * sig((v + 1.15) / 0.05)
    # Liver / abdomen below the domes: thicker soft tissue.
    below = np.where(u < 0, sig((v - scene.dome(-1, -u)) / e), sig((v - scene.dome(1, u)) / e))
    body = body + 0.22 * below * body_prof
    if p["breast"] > 0:
        body = body + p["breast"] * np.exp(-(((au - 0.45) / 0.25) ** 2) - ((v - 0.3) / 0.18) ** 2)
    # Heart: a tilted ellipse, width = CTR * thoracic width (AP views magnify it).
    rx = p["ctr"] * p["lung_hw"] * p["heart_mag"]
    ry = p["heart_ry"] * p["heart_mag"]
    cy = scene.dome(1, 0.45 * p["lung_hw"]) - 0.85 * ry
    du, dv = u - p["heart_cx"] - p["medi_shift"], v - cy
    ct, st = np.cos(p["heart_tilt"]), np.sin(p["heart_tilt"])
    r = np.sqrt(((du * ct + dv * st) / rx) ** 2 + ((-du * st + dv * ct) / ry) ** 2)
    heart = sig((1.0 - r) / 0.04)
    # Mediastinum widens towards the heart; aortic knob on the left.
    mw = p["medi_hw"] + 0.03 * sig((v + 0.1) / 0.08)
    medi = sig((mw - np.abs(u - 0.01 - p["medi_shift"])) / e) * sig((cy - v) / 0.05)
    knob = sig((1 - np.hypot(u - 0.1 - p["medi_shift"], v + 0.33) / 0.055) / 0.1)
    medi = np.maximum(medi, knob)
    air = np.zeros_like(u)
    for side in SIDES:
        uu = side * u
        lat = scene.lat(side, v)
        mid = 0.5 * (scene.med() + p["lung_hw"])
        top = p["lung_top"] + 1.2 * (uu - mid) ** 2
        m = (
            sig((uu - scene.med()) / e)
            * sig((lat - uu) / e)
            * sig((v - top) / e)
            * sig((scene.dome(side, uu) - v) / e)
        )
        depth = 0.75 + 0.25 * np.sqrt(np.clip(1 - ((uu - mid) / (p["lung_hw"] - mid + 1e-3)) ** 2, 0, 1))
        scene.lung_full[side] = m
        vis = m * (1 - heart) * (1 - medi)
        scene.lung[side] = vis.astype(np.float32)
        air = air + p["air"] * m * depth * (1 - 0.8 * heart) * (1 - medi)
    att = body - air + p["heart_dens"] * heart
    # Gastric bubble under the left dome.
    if p["bubble"] > 0.02:
        bu, bv = 0.35, float(scene.dome(1, 0.35)) + 0.07
        att = att - p["bubble"] * sig((1 - np.hypot((u - bu) / 0.09, (v - bv) / 0.05)) / 0.15)
    # Bones: spine, posterior ribs (hollow bands: bright cortex), fainter anterior ribs, clavicles.
    chest = sig((p["body_hw"] - 0.03 - au) / 0.02)
    spine = sig((0.065 - np.abs(u - p["medi_shift"] * 0.3)) / 0.008)
    spine = spine * (0.85 + 0.15 * np.cos(2 * np.pi * (v - p["rib_v0"]) / p["rib_step"]))
    w = p["rib_w"]
    post = _rib_family(v - p["rib_v0"] + 0.3 * au - 0.75 * au * au, p["rib_step"], w, 10, hollow=True)
    ant = _rib_family(v - p["rib_v0"] - 0.2 - 0.3 * (0.8 - au), p["rib_step"], 0.8 * w, 6, hollow=False)
    ant = ant * sig((au - 0.22) / 0.03)
    clav = _band(v - (-0.63 - 0.2 * (au - 0.1)), 0.024) * sig((0.55 - au) / 0.03) * sig((au - 0.04) / 0.02)
    scap = sig((1 - np.hypot((au - p["lung_hw"] + 0.04) / 0.12, (v + 0.45) / 0.22)) / 0.1)
    bones = chest * (post + 0.4 * ant) + 2.0 * spine + 2.0 * clav
    att = att + p["bone"] * bones + p["scapula"] * scap
    scene.heart = heart
    scene.att = att.astype(np.float32)
    # Vessel markings: a tree from each hilum, denser centrally; fine parenchymal texture.
    p0s, p1s, ws = [], [], []
    for i, side in enumerate(SIDES):
        hil = np.array([side * 0.17 + p["medi_shift"], -0.1], dtype=np.float32)
        for a, ln, b in zip(p["vessel_angle"][i], p["vessel_len"][i], p["branch_angle"][i]):
            d = np.array([side * np.cos(a), np.sin(a)], dtype=np.float32) * ln * p["lung_hw"] / 0.75
            p0s.append(hil)
            p1s.append(hil + d)
            ws.append(0.013)
            mid = hil + 0.5 * d
            bd = np.array([side * np.cos(a + b), np.sin(a + b)], dtype=np.float32) * ln * 0.45
            p0s.append(mid)
            p1s.append(mid + bd)
            ws.append(0.009)
    vessels = segments(u, v, np.stack(p0s), np.stack(p1s), np.array(ws), p)
    tex = ndimage.gaussian_filter(
        rng.standard_normal((size, size), dtype=np.float32), sigma=max(size / 110, 0.6), truncate=3.0
    )
    tex = tex / (tex.std() + 1e-6)
    lungs = scene.lung[-1] + scene.lung[1]
    scene.markings = (p["markings"] * np.minimum(vessels, 1.5) + p["texture"] * tex) * lungs
    scene.marking_gain = np.ones_like(u)


def compose(scene: Scene) -> np.ndarray:
    return np.clip(scene.att + scene.markings * scene.marking_gain, 0.0, None).astype(np.float32)
