"""The 14 findings, each a distinct radiological pattern drawn procedurally on the anatomy.

Each finding has `prepare(p, f)` (edits anatomy parameters before rendering: heart size, domes,
hyperinflation, volume loss) and `apply(scene, f, g)` (edits the rendered layers). `f` is the patient's
stream for this finding: location and shape persist across a patient's follow-ups; `g` is this image's
stream: size and intensity jitter, as a lesion seen on another day. Sizes, positions and intensities are
wide on purpose (some findings are faint or hidden behind the heart or ribs), so that recognising them
takes learned features, not a threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from pipeline.demodata.anatomy import SIDES, Scene, segments, sig

Rng = np.random.Generator


def _side(f: Rng) -> int:
    return int(SIDES[int(f.integers(2))])


def _disc(scene: Scene, cu: float, cv: float, r: float, soft: float = 0.15) -> np.ndarray:
    d = np.hypot(scene.u - cu, scene.v - cv) / r
    return np.sqrt(np.clip(1 - d * d, 0, 1)).astype(np.float32) * sig((1 - d) / soft)


def _smooth_noise(scene: Scene, rng: Rng, sigma_frac: float) -> np.ndarray:
    n = ndimage.gaussian_filter(
        rng.standard_normal(scene.u.shape, dtype=np.float32), scene.size * sigma_frac, truncate=3.0
    )
    return n / (n.std() + 1e-6)


def _lungs(scene: Scene) -> np.ndarray:
    return scene.lung[-1] + scene.lung[1]


# --- nodule / mass ---------------------------------------------------------------------------------


def nodule_apply(s: Scene, f: Rng, g: Rng) -> None:
    n = 1 if f.random() < 0.75 else int(f.integers(2, 4))
    for _ in range(n):
        side, t, h = _side(f), f.uniform(0.1, 0.85), f.uniform(0.15, 0.9)
        cu, cv = s.lung_point(side, t, h)
        r = f.uniform(0.022, 0.055) * g.uniform(0.9, 1.1)
        dens = f.uniform(0.05, 0.15) * g.uniform(0.85, 1.15)
        s.att += dens * _disc(s, cu, cv, r, soft=0.25)


def mass_apply(s: Scene, f: Rng, g: Rng) -> None:
    side, t, h = _side(f), f.uniform(0.15, 0.8), f.uniform(0.1, 0.8)
    cu, cv = s.lung_point(side, t, h)
    r = f.uniform(0.07, 0.13) * g.uniform(0.9, 1.15)
    dens = f.uniform(0.1, 0.2) * g.uniform(0.9, 1.1)
    m = np.zeros_like(s.u)
    for _ in range(4):  # lobulated: overlapping lobes
        a, d = f.uniform(0, 2 * np.pi), f.uniform(0.2, 0.55) * r
        m = np.maximum(m, _disc(s, cu + d * np.cos(a), cv + d * np.sin(a), r * f.uniform(0.55, 0.8), 0.2))
    # Spicules: short thin strands radiating from the margin.
    k = int(f.integers(3, 8))
    ang = f.uniform(0, 2 * np.pi, k)
    p0 = np.stack([cu + 0.7 * r * np.cos(ang), cv + 0.7 * r * np.sin(ang)], 1)
    p1 = np.stack([cu + 1.5 * r * np.cos(ang), cv + 1.5 * r * np.sin(ang)], 1)
    spic = segments(s.u, s.v, p0, p1, np.full(k, 0.006), s.p)
    s.att += dens * m + 0.3 * dens * np.minimum(spic, 1.0)


# --- pleura ----------------------------------------------------------------------------------------


def effusion_apply(s: Scene, f: Rng, g: Rng) -> None:
    sides = SIDES if f.random() < 0.35 else (_side(f),)
    for side in sides:
        uu = side * s.u
        dome_lat = float(s.dome(side, s.p["lung_hw"]))
        height = f.uniform(0.03, 0.45) * g.uniform(0.8, 1.2)  # blunted angle .. half the hemithorax
        level = dome_lat - height
        # Meniscus: the fluid climbs higher along the lateral chest wall.
        meniscus = level + f.uniform(0.06, 0.14) * (1 - np.clip(uu / s.p["lung_hw"], 0, 1)) ** 2
        fluid = sig((s.v - meniscus) / 0.02) * sig((uu - s.med() + 0.02) / 0.015)
        fluid = (
            fluid * sig((s.lat(side, s.v) + 0.01 - uu) / 0.012) * sig((s.dome(side, uu) + 0.1 - s.v) / 0.02)
        )
        dens = f.uniform(0.28, 0.4) * g.uniform(0.9, 1.1)
        s.att += dens * fluid * (0.6 + 0.4 * s.lung_full[side])
        s.marking_gain *= 1 - fluid


def pneumothorax_apply(s: Scene, f: Rng, g: Rng) -> None:
    side = _side(f)
    uu = side * s.u
    top, bottom = s.p["lung_top"], float(s.dome(side, 0.45 * s.p["lung_hw"]))
    rel = np.clip((s.v - top) / (bottom - top), 0, 1)
    depth = f.uniform(0.04, 0.22) * g.uniform(0.8, 1.25) * s.p["lung_hw"]
    line = s.lat(side, s.v) - depth * (1.3 - 0.8 * rel)  # widest at the apex
    lung = s.lung_full[side]
    ptx = lung * sig((uu - line) / 0.008)
    s.marking_gain *= 1 - ptx  # no lung markings beyond the pleural line
    s.att -= f.uniform(0.05, 0.1) * ptx
    s.att += lung * (1 - ptx) * f.uniform(0.0, 0.04)  # the collapsed lung is slightly denser
    s.att += f.uniform(0.04, 0.08) * lung * np.exp(-(((uu - line) / 0.005) ** 2))  # visceral pleural line


def pleural_thickening_apply(s: Scene, f: Rng, g: Rng) -> None:
    sides = SIDES if f.random() < 0.4 else (_side(f),)
    apical = f.random() < 0.5
    for side in sides:
        uu = side * s.u
        lung = s.lung_full[side]
        th = f.uniform(0.012, 0.03) * g.uniform(0.9, 1.1)
        dens = f.uniform(0.1, 0.2)
        if apical:  # apical cap
            top = s.p["lung_top"] + 1.2 * (uu - 0.5 * (s.med() + s.p["lung_hw"])) ** 2
            band = np.exp(-(((s.v - top) / (1.5 * th)) ** 2)) * sig((uu - s.med() - 0.05) / 0.03)
        else:  # lateral chest-wall plaque over a stretch of ribs
            v0, v1 = f.uniform(-0.5, 0.0), f.uniform(0.1, 0.4)
            band = (
                np.exp(-(((s.lat(side, s.v) - uu) / th) ** 2))
                * sig((s.v - v0) / 0.05)
                * sig((v1 - s.v) / 0.05)
            )
        s.att += dens * band * lung


# --- airspace / interstitium ----------------------------------------------------------------------


def consolidation_apply(s: Scene, f: Rng, g: Rng) -> None:
    side = _side(f)
    upper = f.random() < 0.4
    fissure = -0.1 + f.uniform(-0.05, 0.08) + 0.15 * side * s.u * f.uniform(-1, 1)
    zone = sig((fissure - s.v) / 0.01) if upper else sig((s.v - fissure) / 0.01)  # sharp at the fissure
    blob = sig(_smooth_noise(s, f, 0.06) * 2.0 + f.uniform(0.5, 2.0))  # ragged non-fissural margins
    region = s.lung_full[side] * zone * blob
    dens = f.uniform(0.18, 0.3) * g.uniform(0.9, 1.1)
    # Air bronchograms: dark branching tubes inside the opacity.
    hil = np.array([side * 0.17, -0.1])
    ang = f.uniform(-1.2, 1.2, 6) + (np.pi if side < 0 else 0.0)
    ang = np.where(upper, ang - 0.5 * side, ang + 0.5 * side)
    p1 = hil + np.stack([np.cos(ang), np.sin(ang)], 1) * f.uniform(0.25, 0.45, (6, 1))
    bronch = np.minimum(segments(s.u, s.v, np.repeat(hil[None], 6, 0), p1, np.full(6, 0.008), s.p), 1)
    s.att += region * (dens - 0.6 * dens * bronch)
    s.marking_gain *= 1 - 0.9 * region


def pneumonia_apply(s: Scene, f: Rng, g: Rng) -> None:
    sides = SIDES if f.random() < 0.3 else (_side(f),)
    patches = np.clip(_smooth_noise(s, f, 0.035) - f.uniform(0.1, 0.7), 0, None)  # multifocal patches
    patches = ndimage.gaussian_filter(patches, s.size * 0.01)
    lower = sig((s.v - f.uniform(-0.25, 0.05)) / 0.08)
    dens = f.uniform(0.1, 0.2) * g.uniform(0.85, 1.15)
    for side in sides:
        s.att += dens * np.minimum(patches, 1.0) * lower * s.lung_full[side]


def infiltration_apply(s: Scene, f: Rng, g: Rng) -> None:
    sides = SIDES if f.random() < 0.5 else (_side(f),)
    haze = np.clip(_smooth_noise(s, f, 0.05) + f.uniform(0.0, 0.8), 0, None)
    centre = f.uniform(-0.35, 0.25)
    zone = np.exp(-(((s.v - centre) / f.uniform(0.2, 0.4)) ** 2))
    dens = f.uniform(0.03, 0.08) * g.uniform(0.8, 1.2)
    for side in sides:
        s.att += dens * np.minimum(haze, 2.0) * zone * s.lung[side]


def atelectasis_prepare(p: dict, f: Rng) -> None:
    side = _side(f)
    p["_atel_side"] = side
    p[f"dome_lift_{side}"] = p.get(f"dome_lift_{side}", 0.0) - f.uniform(0.02, 0.07)  # volume loss
    p["medi_shift"] = p["medi_shift"] + side * f.uniform(0.0, 0.025)


def atelectasis_apply(s: Scene, f: Rng, g: Rng) -> None:
    side = s.p["_atel_side"]
    n = int(f.integers(1, 3))
    for _ in range(n):  # plate-like (discoid) bands in the lower zones
        cu, cv = s.lung_point(side, f.uniform(0.5, 0.9), f.uniform(0.25, 0.7))
        a = f.uniform(-0.35, 0.35)
        half = f.uniform(0.08, 0.2)
        p0 = np.array([[cu - half * np.cos(a), cv - half * np.sin(a)]])
        p1 = np.array([[cu + half * np.cos(a), cv + half * np.sin(a)]])
        band = np.minimum(segments(s.u, s.v, p0, p1, np.array([f.uniform(0.012, 0.028)]), s.p), 1)
        s.att += f.uniform(0.1, 0.2) * g.uniform(0.85, 1.15) * band * s.lung_full[side]
    if f.random() < 0.4:  # lobar collapse: triangular density against the mediastinum
        uu = side * s.u
        tri = sig((s.med() + f.uniform(0.1, 0.2) * (s.v + 0.1) - uu) / 0.015) * sig((s.v + 0.05) / 0.02)
        s.att += f.uniform(0.1, 0.18) * tri * s.lung_full[side]


def edema_apply(s: Scene, f: Rng, g: Rng) -> None:
    dens = f.uniform(0.05, 0.12) * g.uniform(0.8, 1.2)
    for side in SIDES:  # bilateral perihilar "bat wing" haze
        d = np.hypot(s.u - side * 0.17, (s.v + 0.1) * 0.8)
        s.att += dens * np.exp(-((d / f.uniform(0.2, 0.32)) ** 2)) * s.lung_full[side]
        # Kerley B lines: short horizontal lines at the lateral bases.
        k = int(f.integers(4, 10))
        vv = f.uniform(0.0, 0.3, k) + float(s.dome(side, s.p["lung_hw"])) - 0.3
        uu = s.lat(side, vv) - 0.005
        p0 = np.stack([side * uu, vv], 1)
        p1 = np.stack([side * (uu - f.uniform(0.03, 0.06, k)), vv], 1)
        s.att += 0.05 * np.minimum(segments(s.u, s.v, p0, p1, np.full(k, 0.004), s.p), 1) * s.lung_full[side]
    s.marking_gain *= 1 + 0.6 * sig((-0.2 - s.v) / 0.1)  # upper-lobe diversion


def fibrosis_prepare(p: dict, f: Rng) -> None:
    for side in SIDES:
        p[f"dome_lift_{side}"] = p.get(f"dome_lift_{side}", 0.0) - f.uniform(0.0, 0.04)


def fibrosis_apply(s: Scene, f: Rng, g: Rng) -> None:
    n = _smooth_noise(s, f, 0.012)
    net = np.exp(-((n / 0.35) ** 2))  # zero crossings of band-limited noise form a reticular net
    dens = f.uniform(0.05, 0.11) * g.uniform(0.85, 1.15)
    for side in SIDES:
        uu = side * s.u
        periph = sig((uu - s.lat(side, s.v) + f.uniform(0.12, 0.25)) / 0.04)
        lower = sig((s.v - f.uniform(-0.3, 0.0)) / 0.1)
        s.att += dens * net * np.maximum(periph * lower, 0.3 * lower) * s.lung[side]


def emphysema_prepare(p: dict, f: Rng) -> None:
    p["dome_R"] += f.uniform(0.06, 0.12)  # hyperinflation: low, flat diaphragm
    p["dome_curv"] *= f.uniform(0.35, 0.6)
    p["air"] *= f.uniform(1.12, 1.3)
    p["markings"] *= f.uniform(0.45, 0.75)
    p["ctr"] *= f.uniform(0.85, 0.95)  # long narrow heart


def emphysema_apply(s: Scene, f: Rng, g: Rng) -> None:
    for _ in range(int(f.integers(0, 4))):  # apical bullae: lucent with a hairline wall
        cu, cv = s.lung_point(_side(f), f.uniform(0.02, 0.35), f.uniform(0.2, 0.9))
        r = f.uniform(0.04, 0.1)
        d = np.hypot(s.u - cu, s.v - cv) / r
        s.att += (-0.08 * sig((1 - d) / 0.08) + 0.03 * np.exp(-(((d - 1) / 0.08) ** 2))) * _lungs(s)
        s.marking_gain *= 1 - sig((1 - d) / 0.08)


def cardiomegaly_prepare(p: dict, f: Rng) -> None:
    p["ctr"] = f.uniform(0.53, 0.66)
    p["heart_ry"] *= f.uniform(1.05, 1.2)


def hernia_apply(s: Scene, f: Rng, g: Rng) -> None:
    """Hiatal hernia: a retrocardiac round density with an air-fluid level, above the left dome."""
    cu = f.uniform(-0.03, 0.12)
    r = f.uniform(0.07, 0.13) * g.uniform(0.9, 1.1)
    cv = float(s.dome(1, 0.45 * s.p["lung_hw"])) - f.uniform(0.5, 1.0) * r - 0.02
    body = _disc(s, cu, cv, r, soft=0.15)
    level = cv + f.uniform(-0.5, 0.2) * r
    gas = body * sig((level - s.v) / 0.004)
    s.att += f.uniform(0.08, 0.16) * g.uniform(0.9, 1.1) * body - f.uniform(0.12, 0.22) * gas


Prepare = Callable[[dict, Rng], None]
Apply = Callable[[Scene, Rng, Rng], None]


def _noop_prepare(p: dict, f: Rng) -> None:
    return None


def _noop_apply(s: Scene, f: Rng, g: Rng) -> None:
    return None


FINDING_FUNCS: dict[str, tuple[Prepare, Apply]] = {
    "Infiltration": (_noop_prepare, infiltration_apply),
    "Effusion": (_noop_prepare, effusion_apply),
    "Atelectasis": (atelectasis_prepare, atelectasis_apply),
    "Nodule": (_noop_prepare, nodule_apply),
    "Mass": (_noop_prepare, mass_apply),
    "Pneumothorax": (_noop_prepare, pneumothorax_apply),
    "Consolidation": (_noop_prepare, consolidation_apply),
    "Pleural_Thickening": (_noop_prepare, pleural_thickening_apply),
    "Cardiomegaly": (cardiomegaly_prepare, _noop_apply),
    "Emphysema": (emphysema_prepare, emphysema_apply),
    "Edema": (_noop_prepare, edema_apply),
    "Fibrosis": (fibrosis_prepare, fibrosis_apply),
    "Pneumonia": (_noop_prepare, pneumonia_apply),
    "Hernia": (_noop_prepare, hernia_apply),
}
