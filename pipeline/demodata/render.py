"""Render one radiograph: anatomy + findings -> attenuation map -> one vendor's stored pixels.

Random streams (numpy SeedSequence keys, independent of worker count and order):
  (seed, 1, patient)           the patient's anatomy
  (seed, 2, patient, finding)  where and how a finding sits in this patient (stable over follow-ups)
  (seed, 3, image)             this acquisition: positioning, inspiration, texture, noise, exposure
"""

from __future__ import annotations

import numpy as np

from pipeline.demodata.anatomy import Scene, compose, make_grid, patient_params, render_anatomy, visit_params

# the findings' strength against the anatomy, and why 3.0: defaults.py
from pipeline.demodata.defaults import DEFAULT_CONSPICUITY as DEFAULT_CONSPICUITY
from pipeline.demodata.findings import FINDING_FUNCS
from pipeline.demodata.prevalence import FINDINGS
from pipeline.demodata.vendors import Vendor, encode

STREAM_PATIENT, STREAM_FINDING, STREAM_IMAGE = 1, 2, 3


def finding_rng(seed: int, patient: int, finding: str) -> np.random.Generator:
    return np.random.default_rng([seed, STREAM_FINDING, patient, FINDINGS.index(finding)])


def render_attenuation(
    seed: int,
    patient: int,
    image: int,
    labels: tuple[str, ...],
    view: str,
    size: int,
    conspicuity: float = DEFAULT_CONSPICUITY,
) -> tuple[np.ndarray, np.random.Generator]:
    """(attenuation (size, size) float32, this image's generator for the later acquisition steps).

    `conspicuity` multiplies what the findings add to the anatomy (see DEFAULT_CONSPICUITY).
    """
    g = np.random.default_rng([seed, STREAM_IMAGE, image])
    base = patient_params(np.random.default_rng([seed, STREAM_PATIENT, patient]))
    p = visit_params(base, view, g)
    for lab in labels:
        FINDING_FUNCS[lab][0](p, finding_rng(seed, patient, lab))
    u, v = make_grid(size, p)
    scene = Scene(size=size, u=u, v=v, p=p)
    render_anatomy(scene, g)
    att0, gain0 = scene.att.copy(), scene.marking_gain.copy()
    for lab in labels:
        f = finding_rng(seed, patient, lab)
        FINDING_FUNCS[lab][0](dict(p), f)  # replay prepare's draws so apply's draws line up
        FINDING_FUNCS[lab][1](scene, f, g)
    if conspicuity != 1.0:
        # Scale what the findings drew (their attenuation and their loss of lung markings), not the anatomy.
        k = np.float32(conspicuity)
        scene.att = att0 + k * (scene.att - att0)
        scene.marking_gain = gain0 * np.power(np.clip(scene.marking_gain / gain0, 0, None), k)
    return compose(scene), g


def render_radiograph(
    seed: int,
    patient: int,
    image: int,
    labels: tuple[str, ...],
    view: str,
    size: int,
    vendor: Vendor,
    conspicuity: float = DEFAULT_CONSPICUITY,
) -> tuple[np.ndarray, dict]:
    """(stored pixels (size, size) uint16, per-image header values) for one planned image."""
    att, g = render_attenuation(seed, patient, image, labels, view, size, conspicuity)
    return encode(att, vendor, g)
