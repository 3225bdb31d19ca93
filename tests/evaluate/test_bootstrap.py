"""The patient-level (cluster) bootstrap: it agrees with the textbook interval when every query is its own
patient, widens when a few patients recur in many episodes, pairs differences, and is reproducible."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import numpy as np
import pytest

from pipeline.evaluate import summary
from pipeline.evaluate.bootstrap import PatientBootstrap
from pipeline.evaluate.config import BootstrapConfig, EvaluateConfig
from pipeline.evaluate.runner import EpisodeOutcome


def _outcomes(correct: np.ndarray, keys: np.ndarray) -> list[EpisodeOutcome]:
    """Binary episodes whose query rows are right where `correct` (E, q) is True; keys (E, q) scan keys."""
    e, q = correct.shape
    y = np.tile([0, 1], q // 2)
    out = []
    for i in range(e):
        pred = np.where(correct[i], y, 1 - y)
        probs = np.eye(2)[pred] * 0.8 + 0.1  # (q, 2), argmax = pred
        out.append(EpisodeOutcome(i, "binary", 5, ["c", "n"], y, probs, [str(k) for k in keys[i]]))
    return out


def _compare(
    outs: dict[str, list[EpisodeOutcome]], patient_of: dict[str, str], resamples: int = 2000, seed: int = 0
) -> dict:
    scans = summary.slot_scans(next(iter(outs.values())))
    assert scans is not None
    return summary.compare(
        {m: summary.episode_acc_over_seeds([o]) for m, o in outs.items()},
        {m: summary.query_correct_over_seeds([o]) for m, o in outs.items()},
        {slot: patient_of[k] for slot, k in scans.items()},
        resamples=resamples,
        seed=seed,
    )


def test_distinct_patients_give_the_normal_approximation_interval() -> None:
    # 100 episodes x 20 queries, every query a different scan of a different patient: the bootstrap over
    # patients is then an ordinary bootstrap of 2000 independent Bernoulli outcomes
    rng = np.random.default_rng(0)
    correct = rng.random((100, 20)) < 0.7
    keys = np.arange(2000).reshape(100, 20)
    comp = _compare({"a": _outcomes(correct, keys)}, {str(k): f"p{k}" for k in range(2000)}, resamples=4000)
    pat = comp["acc_patient"]["a"]
    p = correct.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / correct.size)  # normal approximation of the per-query accuracy
    assert pat["mean"] == pytest.approx(p)
    assert pat["low"] == pytest.approx(p - half, abs=0.1 * half)
    assert pat["high"] == pytest.approx(p + half, abs=0.1 * half)
    boot = comp["patient_bootstrap"]
    assert boot["n_patients"] == 2000 and boot["n_query_slots"] == 2000 and boot["n_resamples"] == 4000


def test_patients_reused_in_many_episodes_widen_the_interval() -> None:
    # 30 patients fill 600 episodes x 20 query slots; a patient's queries are all right or all wrong
    # (perfectly correlated): the information is 30 patients, not 12000 queries or 600 episodes
    rng = np.random.default_rng(1)
    n_pat = 30
    easy = np.arange(n_pat) < n_pat // 2
    keys = rng.integers(0, n_pat, size=(600, 20))  # scan key = patient index (one scan per patient)
    comp = _compare({"a": _outcomes(easy[keys], keys)}, {str(k): f"p{k}" for k in range(n_pat)})
    ep = comp["acc"]["a"]
    pat = comp["acc_patient"]["a"]
    episode_width = 2 * ep["ci95"]
    patient_width = pat["high"] - pat["low"]
    assert patient_width > 8 * episode_width, (patient_width, episode_width)
    # and it is about the interval of 30 independent patients: 2 * 1.96 * sqrt(0.25 / 30) = 0.36
    assert patient_width == pytest.approx(2 * 1.96 * math.sqrt(0.25 / n_pat), rel=0.25)
    assert comp["patient_bootstrap"]["n_patients"] == n_pat


def test_paired_difference_is_narrower_than_unpaired_when_errors_are_correlated() -> None:
    # 200 patients with 10 query slots each; both methods fail on the same hard patients, B additionally on
    # 5% of slots. Resampling the same patients for both cancels the shared difficulty out of the difference.
    rng = np.random.default_rng(2)
    n_pat, per = 200, 10
    hard = rng.random(n_pat) < 0.4
    slot_patient = np.repeat(np.arange(n_pat), per)
    a = (~hard[slot_patient]).astype(float)
    b = a * (rng.random(a.size) >= 0.05)
    keys = [f"p{p}" for p in slot_patient]
    paired = PatientBootstrap(keys, 2000, 0).difference(a, b)
    unpaired = PatientBootstrap(keys, 2000, 1).samples(a) - PatientBootstrap(keys, 2000, 2).samples(b)
    lo, hi = np.quantile(unpaired, [0.025, 0.975])
    assert paired.mean == pytest.approx(a.mean() - b.mean())
    assert paired.high - paired.low < 0.5 * (hi - lo), (paired, lo, hi)
    assert paired.excludes_zero and lo < 0 < hi  # only the paired interval sees that B is worse

    # the same through compare(): the winner's paired difference and its verdict flag
    e_keys = np.arange(n_pat * per).reshape(-1, per)  # one scan per slot, 10 scans per patient
    patient_of = {str(k): f"p{k // per}" for k in range(n_pat * per)}
    outs = {"a": _outcomes(a.reshape(-1, per) > 0, e_keys), "b": _outcomes(b.reshape(-1, per) > 0, e_keys)}
    comp = _compare(outs, patient_of)
    d = comp["vs_winner"]["b"]["paired_diff_patient"]
    assert comp["winner"] == "a" and d["excludes_zero"] and d["low"] > 0
    assert d["mean"] == pytest.approx(a.mean() - b.mean())


def test_fixed_seed_is_deterministic_and_the_seed_matters() -> None:
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 40, size=(50, 10))
    patient_of = {str(k): f"p{k}" for k in range(40)}
    outs = {
        "a": _outcomes(rng.random((50, 10)) < 0.6, keys),
        "b": _outcomes(rng.random((50, 10)) < 0.5, keys),
    }
    one, two = _compare(outs, patient_of, seed=5), _compare(outs, patient_of, seed=5)
    assert one == two
    other = _compare(outs, patient_of, seed=6)
    assert other["acc_patient"]["a"] != one["acc_patient"]["a"]
    assert other["acc_patient"]["a"]["low"] == pytest.approx(one["acc_patient"]["a"]["low"], abs=0.03)
    assert one["patient_bootstrap"]["seed"] == [5]


def test_query_correctness_is_averaged_over_seeds_first() -> None:
    keys = np.array([["s0", "s1"]])
    right = _outcomes(np.array([[True, True]]), keys)
    half = _outcomes(np.array([[False, True]]), keys)
    assert summary.query_correct_over_seeds([right, half]) == {(0, 0): 0.5, (0, 1): 1.0}
    comp = summary.compare(
        {"m": summary.episode_acc_over_seeds([right, half])},
        {"m": summary.query_correct_over_seeds([right, half])},
        {(0, 0): "p0", (0, 1): "p1"},
    )
    assert comp["acc_patient"]["m"]["mean"] == pytest.approx(0.75)


def test_methods_on_other_slots_are_refused() -> None:
    keys = np.array([["s0", "s1"]])
    o = _outcomes(np.array([[True, False]]), keys)
    with pytest.raises(ValueError, match="same query slots"):
        summary.compare(
            {"m": summary.episode_acc_over_seeds([o])},
            {"m": summary.query_correct_over_seeds([o])},
            {(0, 0): "p0", (0, 1): "p1", (1, 0): "p2"},
        )


def _python_lines(fn: Callable[[], object]) -> tuple[object, int]:
    """fn's result and how many lines of pipeline/evaluate/*.py ran meanwhile (a count of Python-level
    work, free of the machine's speed)."""
    folder = str(Path(summary.__file__).parent)
    lines = 0

    def trace(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        nonlocal lines
        if not frame.f_code.co_filename.startswith(folder):
            return None  # do not trace numpy or the standard library line by line
        if event == "line":
            lines += 1
        return trace

    sys.settrace(trace)
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return out, lines


def test_python_work_does_not_grow_with_the_resamples() -> None:
    """The bootstrap's resamples are array operations: the Python lines run for four methods are the same
    for 200 and for 4000 resamples, so a fall back to a per-resample Python loop (thousands more lines)
    fails here, on any machine. Its speed is measured in benchmarks/bench_bootstrap.py. (With 50 patients
    the resample counts are drawn in one block either way: `_BLOCK_CELLS` cells per block.)"""
    rng = np.random.default_rng(4)
    keys = rng.integers(0, 120, size=(60, 20))
    patient_of = {str(k): f"p{k % 50}" for k in range(120)}
    outs = {m: _outcomes(rng.random((60, 20)) < 0.6, keys) for m in ("a", "b", "c", "d")}
    few, lines_few = _python_lines(lambda: _compare(outs, patient_of, resamples=200))
    many, lines_many = _python_lines(lambda: _compare(outs, patient_of, resamples=4000))
    assert lines_few > 0 and lines_many == lines_few, (lines_few, lines_many)
    for comp in (few, many):
        assert isinstance(comp, dict) and comp["patient_bootstrap"]["n_patients"] == 50


def test_config_names_the_bootstrap_knobs() -> None:
    cfg = EvaluateConfig.model_validate({"bootstrap": {"resamples": 500, "seed": 3}})
    assert (cfg.bootstrap.resamples, cfg.bootstrap.seed) == (500, 3)
    assert EvaluateConfig().bootstrap.resamples == 2000
    assert "patients" in (BootstrapConfig.model_fields["resamples"].description or "")
    with pytest.raises(ValueError, match="resamples"):
        EvaluateConfig.model_validate({"bootstrap": {"resamples": 10}})
    with pytest.raises(ValueError, match="resampels"):  # a typo is named, not ignored
        EvaluateConfig.model_validate({"bootstrap": {"resampels": 500}})


def test_per_condition_intervals_use_only_that_conditions_slots_and_patients() -> None:
    """Binary: a condition's interval is computed on its own episodes' slots. A method perfect on condition
    A's episodes and always wrong on B's gets [1, 1] and [0, 0]; the patients counted are that condition's.
    n-way: the slots whose true class is the condition (its pooled recall)."""
    rng = np.random.default_rng(0)
    outs = []
    for i in range(40):  # 20 episodes of A, 20 of B; 4 queries each, patients reused within a condition
        cond = "A" if i < 20 else "B"
        y = np.array([0, 1, 0, 1])
        pred = y if cond == "A" else 1 - y
        keys = [f"{cond}{rng.integers(0, 6)}" for _ in range(4)]
        outs.append(EpisodeOutcome(i, "binary", 5, [cond, "normal"], y, np.eye(2)[pred] * 0.8 + 0.1, keys))
    slots = summary.condition_slots(outs)
    assert {c: len(v) for c, v in slots.items()} == {"A": 80, "B": 80}
    per_query = {"m": summary.query_correct_over_seeds([outs])}
    scans = summary.slot_scans(outs)
    assert scans is not None
    res = summary.per_condition_patient(per_query, dict(scans), slots, resamples=500, seed=[0])
    assert res["acc"]["m"]["A"] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert res["acc"]["m"]["B"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    assert res["n_patients"] == {"A": len({k for o in outs[:20] for k in o.query_keys or []}), "B": 6}

    # n-way: recall of class "X" over the slots whose true class is X, resampled by patient
    y = np.array([0, 1, 2, 0, 1, 2])
    pred = np.array([0, 1, 2, 1, 1, 2])  # X right once of twice, Y and Z always right
    nway = [EpisodeOutcome(0, "n_way", 2, ["X", "Y", "Z"], y, np.eye(3)[pred] * 0.7 + 0.1, list("abcdef"))]
    s_n = summary.condition_slots(nway)
    assert s_n == {"X": [(0, 0), (0, 3)], "Y": [(0, 1), (0, 4)], "Z": [(0, 2), (0, 5)]}
    pq = {"m": summary.query_correct_over_seeds([nway])}
    r = summary.per_condition_patient(pq, {(0, i): k for i, k in enumerate("abcdef")}, s_n, 500, [1])
    assert r["acc"]["m"]["X"]["mean"] == pytest.approx(0.5)
    assert r["acc"]["m"]["X"]["low"] == 0.0 and r["acc"]["m"]["X"]["high"] == 1.0  # two patients, one wrong
    assert r["acc"]["m"]["Y"] == {"mean": 1.0, "low": 1.0, "high": 1.0}


# ----------------------------------------------------------------------------- seeds (two-level)
def test_one_seed_is_exactly_the_patient_bootstrap() -> None:
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 40, 300).astype(str)
    boot = PatientBootstrap(keys, 1000, [7])
    c = (rng.random(300) < 0.6).astype(float)
    assert np.array_equal(boot.samples_over_seeds(c[None], boot.seed_weights(1, [1])), boot.samples(c))
    ci = boot.accuracy_over_seeds(c[None], [1])
    assert ci == boot.accuracy(c)


def test_seed_weights_draw_each_methods_seeds_with_replacement() -> None:
    boot = PatientBootstrap(np.arange(10).astype(str), 500, [0])
    w = boot.seed_weights(3, [5])
    assert w.shape == (500, 3)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert set(np.round(w.ravel() * 3).astype(int).tolist()) <= {0, 1, 2, 3}
    assert np.array_equal(w, boot.seed_weights(3, [5]))  # reproducible per key
    assert not np.array_equal(w, boot.seed_weights(3, [6]))
    with pytest.raises(ValueError, match="n_seeds"):
        boot.seed_weights(0, [5])


def test_seeds_that_disagree_widen_the_interval_and_are_averaged() -> None:
    # 200 patients, one query each. Three training runs of one method: 55%, 70% and 85% right.
    rng = np.random.default_rng(0)
    boot = PatientBootstrap([f"p{i}" for i in range(200)], 4000, [1])
    runs = np.stack([(rng.random(200) < p).astype(float) for p in (0.55, 0.70, 0.85)])
    pooled = boot.accuracy(runs.mean(axis=0))  # seeds averaged first: seed variance invisible
    two_level = boot.accuracy_over_seeds(runs, [2])
    assert two_level.mean == pytest.approx(runs.mean())
    assert (two_level.high - two_level.low) > 1.5 * (pooled.high - pooled.low)
    # three identical runs: no seed variance, same interval as one run
    same = np.stack([runs[1]] * 3)
    assert boot.accuracy_over_seeds(same, [2]) == boot.accuracy(runs[1])


def test_a_lead_that_one_seed_carries_is_not_supported_across_seeds() -> None:
    # Method a beats b by 10 points with its first seed, but its other two seeds are no better than b:
    # the single-seed patient bootstrap supports the lead, the seed + patient bootstrap does not.
    rng = np.random.default_rng(4)
    n = 400
    boot = PatientBootstrap([f"p{i}" for i in range(n)], 4000, [0])
    base = (rng.random(n) < 0.6).astype(float)
    lucky = np.maximum(base, (rng.random(n) < 0.25).astype(float))  # ~+10 points
    a = np.stack([lucky, (rng.random(n) < 0.55).astype(float), (rng.random(n) < 0.55).astype(float)])
    b = np.stack([base, base, base])
    assert boot.difference(a[0], b[0]).excludes_zero
    d = boot.difference_over_seeds(a, b, [1], [2])
    assert d.mean == pytest.approx(a.mean() - b.mean())
    assert not d.excludes_zero


def test_compare_with_per_seed_maps_reports_seed_counts_and_all_pairs() -> None:
    rng = np.random.default_rng(1)
    keys = np.arange(200).reshape(20, 10)
    patient_of = {str(k): f"p{k % 60}" for k in range(200)}
    outs = {
        m: [_outcomes(rng.random((20, 10)) < p, keys) for _ in range(n_seeds)]
        for m, p, n_seeds in (("good", 0.9, 3), ("mid", 0.7, 1), ("bad", 0.5, 2))
    }
    scans = summary.slot_scans(outs["good"][0])
    assert scans is not None
    comp = summary.compare(
        {m: summary.episode_acc_over_seeds(o) for m, o in outs.items()},
        {m: summary.query_correct_per_seed(o) for m, o in outs.items()},
        {slot: patient_of[k] for slot, k in scans.items()},
        resamples=1000,
        seed=[0],
    )
    assert comp["ranking"] == ["good", "mid", "bad"]
    assert comp["n_seeds"] == {"good": 3, "mid": 1, "bad": 2}
    assert set(comp["pairs_patient"]) == {"good - mid", "good - bad", "mid - bad"}
    gm = comp["pairs_patient"]["good - mid"]
    assert gm["low"] == comp["vs_winner"]["mid"]["paired_diff_patient"]["low"]  # the same draws
    assert (
        comp["pairs_patient"]["mid - bad"]["excludes_zero"] and comp["pairs_patient"]["mid - bad"]["mean"] > 0
    )
