"""Prevalence and patient structure of the planned study (planning only: fast at full size)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.demodata.plan import plan_patients_labels, realize
from pipeline.demodata.prevalence import FINDINGS, NIH_COUNTS, NORMAL, target_counts


def _stats(plan):
    counts = {f: 0 for f in FINDINGS}
    patients = {f: 0 for f in FINDINGS}
    normal = multi = abnormal = 0
    for visits in plan:
        for f in FINDINGS:
            n = sum(f in s for s in visits)
            counts[f] += n
            patients[f] += n > 0
        normal += sum(not s for s in visits)
        abnormal += sum(bool(s) for s in visits)
        multi += sum(len(s) > 1 for s in visits)
    return counts, patients, normal, multi, abnormal


@pytest.mark.parametrize(("n", "floor", "min_patients", "seed"),
                         [(3000, 40, 27, 0), (3000, 40, 27, 1), (500, 20, 14, 0), (500, 20, 14, 5)])  # fmt: skip
def test_prevalence_follows_nih_with_a_floor(n, floor, min_patients, seed):
    plan = plan_patients_labels(n, floor, None, np.random.default_rng(seed))
    counts, patients, normal, multi, abnormal = _stats(plan)
    assert normal + abnormal == n
    want, want_normal = target_counts(n, floor)
    assert counts == want and normal == want_normal
    seq = [counts[f] for f in FINDINGS]
    assert seq == sorted(seq, reverse=True)  # the table's order survives the floor
    assert min(seq) >= floor
    # Common findings keep NIH's proportions: Infiltration / Effusion as in the table (+-2%).
    assert counts["Infiltration"] / counts["Effusion"] == pytest.approx(19894 / 13317, rel=0.02)
    assert min(patients.values()) >= min_patients  # rare findings span enough patients for k-shot splits
    # Multi-label images at NIH's rate (81,176 labels on 51,759 abnormal images -> ~1.57 per image).
    assert 0.25 < multi / abnormal < 0.6
    if n == 3000:
        assert normal / n == pytest.approx(NIH_COUNTS[NORMAL] / 112120, abs=0.01)


def test_patients_have_follow_ups_and_ids_do_not_reveal_conditions():
    rng = np.random.default_rng(1)
    plan = plan_patients_labels(600, 10, None, rng)
    sizes = np.array([len(v) for v in plan])
    assert sizes.mean() > 1.8 and sizes.max() >= 4
    patients, images = realize(plan, rng)
    ids = [p.identity.patient_id for p in patients]
    assert len(set(ids)) == len(ids)
    # The rarest finding's patients are spread over the id order, not clustered at one end.
    pos = [i for i, v in enumerate(plan) if any("Hernia" in s for s in v)]
    assert np.ptp(pos) > len(plan) / 2
    names = [im.image_index for im in images]
    assert len(set(names)) == len(names)


def test_explicit_patient_count_is_honoured_or_refused():
    from pipeline.errors import ConfigError

    plan = plan_patients_labels(600, 10, 200, np.random.default_rng(2))
    assert len(plan) == 200 and sum(len(v) for v in plan) == 600
    with pytest.raises(ConfigError, match="--patients"):
        plan_patients_labels(600, 10, 20, np.random.default_rng(2))
