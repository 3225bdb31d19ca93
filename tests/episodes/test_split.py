"""Condition split and patient pools: names checked against the index, priority rule, disjointness
(property-based on randomized indices), the not-enough-patients table, and drop mode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.labels import LabelTable
from pipeline.episodes.split import build_split, validate_condition_names
from pipeline.errors import ConfigError, DataError

from .helpers import NORMAL, index_from_rows, patients, small_cfg, small_index

N = NORMAL


def _table(df):
    return LabelTable.from_index(df, NORMAL)


def _patient_pool(split: dict, df) -> dict[str, set[str]]:
    key_to_patient = dict(zip(df["scan_key"], df["patient_key"]))
    out: dict[str, set[str]] = {}
    for pool, lists in split["pools"].items():
        for keys in lists.values():
            for k in keys:
                out.setdefault(key_to_patient[k], set()).add(pool)
    return out


def test_unknown_condition_lists_valid_names_and_closest_match() -> None:
    t = _table(small_index())
    cfg = small_cfg(split={"rare": ["Hernai"], "validation": ["pleural thickening"]})
    with pytest.raises(ConfigError) as err:
        validate_condition_names(cfg.split, t.names, NORMAL)
    msg = str(err.value)
    assert "unknown condition 'Hernai'. Did you mean 'Hernia'?" in msg
    assert "Did you mean 'Pleural_Thickening'?" in msg
    assert "Valid conditions in this scan index: Atelectasis, Cardiomegaly" in msg


def test_normal_label_is_not_a_condition() -> None:
    t = _table(small_index())
    with pytest.raises(ConfigError, match="is the normal label"):
        validate_condition_names(EpisodesConfig(split={"rare": [NORMAL]}).split, t.names, NORMAL)


def test_priority_rule_puts_a_patient_with_a_rare_finding_in_test() -> None:
    # patient 0: one Effusion scan (common) and one Hernia scan (rare) -> test pool, whole patient
    rows = [(0, "Effusion"), (0, "Hernia"), (0, N)]
    rows += patients(12, "Effusion", 100) + patients(12, "Mass", 200) + patients(12, "Hernia", 300)
    rows += patients(12, "Emphysema", 400) + patients(60, N, 500)
    df = index_from_rows(rows)
    cfg = EpisodesConfig(
        split={"common": ["Effusion", "Mass"], "validation": ["Emphysema"], "rare": ["Hernia"]},
        kinds=["binary"],
        k_shot=1,
        q_query=2,
    )
    split, _ = build_split(_table(df), cfg)
    assert df.loc[1, "scan_key"] in split["pools"]["test"]["Hernia"]
    assert (
        df.loc[0, "scan_key"] not in split["pools"]["train"]["Effusion"]
    )  # the patient's common scan goes unused
    assert df.loc[2, "scan_key"] in split["pools"]["test"][N]  # their normal scan serves the test pool
    assert split["conditions"]["Effusion"]["patients"] == 13
    assert split["conditions"]["Effusion"]["pool_patients"] == 12
    assert set(split["pools"]["train"]) == {"Effusion", "Mass", N}
    assert set(split["pools"]["test"]) == {"Hernia", N}


def test_normal_only_patients_shared_by_fraction() -> None:
    rows = patients(10, "Effusion", 0) + patients(10, "Hernia", 100) + patients(10, "Mass", 150)
    rows += patients(1000, N, 1000, scans=2)
    cfg = EpisodesConfig(
        split={"common": ["Effusion"], "rare": ["Hernia"], "validation": ["Mass"]},
        kinds=["binary"],
        k_shot=1,
        q_query=1,
        normal_fraction={"train": 0.5, "val": 0.2, "test": 0.3},
    )
    split, _ = build_split(_table(index_from_rows(rows)), cfg)
    assert split["normal"]["train"]["patients"] == 500
    assert split["normal"]["val"]["patients"] == 200
    assert split["normal"]["test"]["patients"] == 300
    assert split["normal"]["train"]["images"] == 1000  # both scans of a patient go together


def test_rule_based_split_by_patient_count() -> None:
    rows = patients(40, "Effusion", 0) + patients(20, "Mass", 100) + patients(8, "Hernia", 200)
    rows += patients(60, N, 300)
    cfg = EpisodesConfig(
        split={"rare_below_patients": 10, "validation_below_patients": 30},
        kinds=["binary"],
        k_shot=1,
        q_query=2,
    )
    split, _ = build_split(_table(index_from_rows(rows)), cfg)
    got = {n: i["split"] for n, i in split["conditions"].items()}
    assert got == {"Effusion": "train", "Mass": "val", "Hernia": "test"}


def test_not_enough_patients_fails_with_a_table_of_every_condition() -> None:
    df = small_index()
    cfg = small_cfg(k_shot=[1, 10], q_query=25)  # needs 35 patients per class; Hernia has ~30
    with pytest.raises(DataError) as err:
        build_split(_table(df), cfg)
    msg = str(err.value)
    assert "needs 35 distinct patients per class (k_shot 10 + q_query 25" in msg
    lines = msg.splitlines()
    for name in _table(df).names:  # every condition has a row, not only the short ones
        assert any(line.strip().startswith(name) for line in lines), name
    hernia = next(line for line in lines if line.strip().startswith("Hernia"))
    assert "TOO FEW" in hernia and " 35 " in hernia
    assert "on_insufficient: drop" in msg


def test_drop_mode_drops_short_conditions_with_a_warning() -> None:
    rows = patients(30, "Effusion", 0) + patients(30, "Mass", 100) + patients(30, "Nodule", 200)
    rows += patients(30, "Edema", 300) + patients(4, "Hernia", 400) + patients(30, "Fibrosis", 500)
    rows += patients(200, N, 1000)
    df = index_from_rows(rows)
    cfg = EpisodesConfig(
        split={"common": ["Effusion", "Mass", "Nodule"], "rare": ["Edema", "Hernia", "Fibrosis"]},
        kinds=["binary"],
        k_shot=[1, 2],
        q_query=3,
        val_episodes=0,
        on_insufficient="drop",
    )
    split, warnings = build_split(_table(df), cfg)
    assert split["conditions"]["Hernia"]["split"] == "dropped"
    assert "4 eligible patients in the test pool" in split["conditions"]["Hernia"]["reason"]
    assert "Hernia" not in split["pools"]["test"]
    assert any("Hernia" in w for w in warnings)
    # Its patients stay in the test pool: dropping never moves a rare-condition patient into training.
    pool = _patient_pool(split, df)
    assert all(pool.get(f"p{400 + i:015x}", {"test"}) == {"test"} for i in range(4))


def test_too_few_conditions_for_n_way_is_a_clear_error() -> None:
    rows = patients(30, "Effusion", 0) + patients(30, "Mass", 100) + patients(30, "Hernia", 200)
    rows += patients(100, N, 1000)
    cfg = EpisodesConfig(
        split={"rare": ["Hernia"]}, kinds=["n_way"], n_way=2, k_shot=1, q_query=2, val_episodes=0
    )
    with pytest.raises(
        DataError, match=r"rare \(meta-test\) split has 1 usable condition.*lower episodes.n_way"
    ):
        build_split(_table(index_from_rows(rows)), cfg)


# ---------------------------------------------------------------- property: pools are patient-disjoint
CONDS = ["A", "B", "C", "D", "E", "F"]


@st.composite
def random_index(draw):
    n_pat = draw(st.integers(20, 80))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, size=n_pat)
    rows = []
    for p in range(n_pat):
        for _ in range(per[p]):
            k = int(rng.integers(0, 3))  # 0 findings (normal), 1 or 2
            labs = sorted(rng.choice(CONDS, size=k, replace=False).tolist())
            rows.append((p, "|".join(labs) if labs else N))
    assign = draw(
        st.lists(st.sampled_from(["common", "validation", "rare", "exclude"]), min_size=6, max_size=6)
    )
    return index_from_rows(rows), assign, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_index())
def test_pools_are_patient_disjoint_on_random_indices(case) -> None:
    df, assign, seed = case
    split_cfg: dict[str, list[str]] = {"common": [], "validation": [], "rare": [], "exclude": []}
    for c, where in zip(CONDS, assign):
        split_cfg[where].append(c)
    cfg = EpisodesConfig(
        split=split_cfg, kinds=["binary"], k_shot=1, q_query=1, seed=seed, on_insufficient="drop"
    )
    try:
        split, _ = build_split(_table(df), cfg)
    except DataError:
        return  # too few normal patients or no usable condition in a pool: refused, nothing to check
    pool_of = _patient_pool(split, df)
    assert all(len(p) == 1 for p in pool_of.values())  # a patient belongs to one pool only
    # no patient of an earlier pool has any scan (anywhere) of a later split's condition
    order = {"train": 0, "val": 1, "test": 2}
    for _, row in df.iterrows():
        pools = pool_of.get(row["patient_key"])
        if not pools:
            continue
        p = order[next(iter(pools))]
        for lab in row["labels"].split("|"):
            s = split["conditions"].get(lab, {}).get("split")
            if s in order and s != "dropped":
                assert order[s] <= p
    # every pool list holds scans that carry the label, of the pool's own split
    labels = dict(zip(df["scan_key"], df["labels"]))
    for pool, lists in split["pools"].items():
        for name, keys in lists.items():
            for k in keys:
                assert labels[k] == N if name == N else name in labels[k].split("|")
            if name != N:
                assert split["conditions"][name]["split"] == pool


def test_drop_mode_that_empties_a_split_fails_with_the_table() -> None:
    rows = patients(30, "Effusion", 0) + patients(30, "Mass", 100) + patients(5, "Hernia", 200)
    rows += patients(100, N, 1000)
    cfg = EpisodesConfig(
        split={"rare": ["Hernia"]},
        kinds=["binary"],
        k_shot=2,
        q_query=4,
        val_episodes=0,
        on_insufficient="drop",
    )
    with pytest.raises(DataError) as err:
        build_split(_table(index_from_rows(rows)), cfg)
    msg = str(err.value)
    assert "rare (meta-test) split has 0 usable condition(s) [] (Hernia dropped for too few patients)" in msg
    hernia = next(line for line in msg.splitlines() if line.strip().startswith("Hernia"))
    assert "TOO FEW, dropped" in hernia and " 5 " in hernia
