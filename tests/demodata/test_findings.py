"""Findings are distinct, visible-but-variable patterns, and stable within a patient."""

from __future__ import annotations

import itertools

import numpy as np

from pipeline.demodata.prevalence import FINDINGS
from pipeline.demodata.render import render_attenuation


def _diff(finding, patient=4, image=4, size=96):
    base, _ = render_attenuation(0, patient, image, (), "PA", size)
    a, _ = render_attenuation(0, patient, image, (finding,), "PA", size)
    return a - base


def test_every_finding_changes_the_image_in_its_own_way():
    diffs = {f: _diff(f) for f in FINDINGS}
    for f, d in diffs.items():
        assert np.abs(d).max() > 0.03, f  # visible
        assert (np.abs(d) > 0.01).mean() < 0.6, f  # local, not a global brightness shift
    # Pairwise: the change maps are not alike (correlation well below 1).
    for a, b in itertools.combinations(FINDINGS, 2):
        da, db = diffs[a].ravel(), diffs[b].ravel()
        r = np.corrcoef(da, db)[0, 1]
        assert r < 0.9, (a, b, r)


def test_a_patients_lesion_persists_across_follow_ups_but_varies_between_patients():
    def centroid(d):
        w = np.clip(d, 0, None)
        ys, xs = np.indices(d.shape)
        return np.array([(w * ys).sum(), (w * xs).sum()]) / w.sum()

    same = [centroid(_diff("Nodule", patient=9, image=i)) for i in (100, 101, 102)]
    other = [centroid(_diff("Nodule", patient=p, image=200 + p)) for p in range(10, 16)]
    spread_same = max(np.linalg.norm(a - b) for a, b in itertools.combinations(same, 2))
    spread_other = np.median([np.linalg.norm(a - b) for a, b in itertools.combinations(other, 2)])
    assert spread_same < 12 < spread_other  # pixels at 96x96: positioning jitter vs another patient


def test_anatomy_varies_per_patient_and_visit():
    a, _ = render_attenuation(0, 1, 1, (), "PA", 64)
    b, _ = render_attenuation(0, 2, 2, (), "PA", 64)
    c, _ = render_attenuation(0, 1, 3, (), "AP", 64)
    assert np.abs(a - b).mean() > 0.02 and np.abs(a - c).mean() > 0.01


def test_conspicuity_scales_what_a_finding_draws_and_leaves_the_anatomy_alone():
    # A normal image is the same at any conspicuity: only the findings' contribution is scaled.
    n1, _ = render_attenuation(0, 4, 4, (), "PA", 64, conspicuity=1.0)
    n3, _ = render_attenuation(0, 4, 4, (), "PA", 64, conspicuity=3.0)
    assert np.array_equal(n1, n3)
    # An additive lesion (a nodule adds density, no marking loss): the difference to the normal image
    # triples, up to the final clip at 0 (none here: the lesion adds density).
    d1 = render_attenuation(0, 4, 4, ("Nodule",), "PA", 64, conspicuity=1.0)[0] - n1
    d3 = render_attenuation(0, 4, 4, ("Nodule",), "PA", 64, conspicuity=3.0)[0] - n1
    assert np.abs(d1).max() > 0.01
    np.testing.assert_allclose(d3, 3.0 * d1, atol=1e-5)


def test_conspicuity_out_of_range_is_a_clear_config_error(tmp_path):
    import pytest

    from pipeline.demodata.generate import generate_study
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="conspicuity=0"):
        generate_study(tmp_path / "x", n_images=10, conspicuity=0)
