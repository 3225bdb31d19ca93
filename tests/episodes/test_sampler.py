"""Samplers: binary and n-way episodes, the multi-label rule, patient separation inside episodes,
determinism from the seed, the train sampler's pool and mixing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.episodes.build import build_episodes
from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.labels import LabelTable
from pipeline.episodes.sampler import EpisodeSampler, TrainSampler, fixed_episodes
from pipeline.episodes.split import build_split
from pipeline.errors import DataError

from .helpers import META, NORMAL, index_from_rows, patients, small_cfg, small_index

N = NORMAL


@pytest.fixture(scope="module")
def study():
    df = small_index(seed=3)
    cfg = small_cfg()
    return df, cfg, build_episodes(df, META, cfg)


def _maps(df):
    return dict(zip(df["scan_key"], df["patient_key"])), dict(zip(df["scan_key"], df["labels"]))


def _assert_episode_clean(
    ep, maps, pool_keys: set[str], k: int, q: int, multilabel: str = "exclusive_in_episode"
):
    patient, labels = maps
    sup_p = [patient[s] for c in ep.classes for s in ep.support[c]]
    qry_p = [patient[s] for c in ep.classes for s in ep.query[c]]
    assert not set(sup_p) & set(qry_p)  # support and query from different patients
    assert len(set(sup_p)) == len(sup_p) and len(set(qry_p)) == len(qry_p)  # one scan per patient
    conds = {c for c in ep.classes if c != N}
    for c in ep.classes:
        assert len(ep.support[c]) == k and len(ep.query[c]) == q
        for s in ep.support[c] + ep.query[c]:
            assert s in pool_keys
            labs = set(labels[s].split("|"))
            if c == N:
                assert labels[s] == N
            elif multilabel == "single_finding":
                assert labs == {c}
            else:
                assert c in labs and not (labs & conds) - {c}


def test_binary_and_n_way_fixed_episodes(study) -> None:
    df, cfg, built = study
    test_keys = {k for keys in built.split["pools"]["test"].values() for k in keys}
    rare = sorted(n for n, i in built.split["conditions"].items() if i["split"] == "test")
    assert len(built.test) == 2 * 2 * cfg.test_episodes  # kinds x k_shots x test_episodes
    assert [e.id for e in built.test] == list(range(len(built.test)))
    binary = [e for e in built.test if e.kind == "binary"]
    nway = [e for e in built.test if e.kind == "n_way"]
    assert all(e.classes[1] == N and e.classes[0] in rare for e in binary)
    # binary episodes cycle through the rare conditions: the same number of test episodes each
    assert set(Counter(e.classes[0] for e in binary).values()) == {len(binary) // len(rare)}
    assert all(
        len(set(e.classes)) == cfg.n_way and N not in e.classes and set(e.classes) <= set(rare) for e in nway
    )
    # class order is shuffled in n-way episodes: label 0 is not always the same condition
    assert len({e.classes[0] for e in nway}) > 1
    maps = _maps(df)
    for e in built.test:
        _assert_episode_clean(e, maps, test_keys, e.k_shot, cfg.q_query)
    assert Counter(e.k_shot for e in built.test) == {1: 2 * cfg.test_episodes, 5: 2 * cfg.test_episodes}


def test_multilabel_rule_depends_on_the_episode_classes() -> None:
    # Hernia is seen only together with Fibrosis for patients 0-9, alone for 10-19.
    rows = patients(10, "Fibrosis|Hernia", 0) + patients(10, "Hernia", 10) + patients(20, "Fibrosis", 20)
    rows += patients(20, "Edema", 40) + patients(20, "Effusion", 60) + patients(20, "Mass", 80)
    rows += patients(40, N, 100) + [(200, "Effusion|" + N)]  # a contradictory label is never "normal"
    df = index_from_rows(rows)
    base = dict(
        split={"common": ["Effusion", "Mass"], "rare": ["Edema", "Fibrosis", "Hernia"]},
        n_way=2,
        k_shot=2,
        q_query=3,
        val_episodes=0,
    )
    for policy in ("exclusive_in_episode", "single_finding"):
        cfg = EpisodesConfig(**base, kinds=["binary", "n_way"], multilabel=policy)
        # Hernia alone: 10 patients; 20 against Edema (never together), the class set the check uses
        split, _ = build_split(LabelTable.from_index(df, N), cfg)
        assert split["conditions"]["Hernia"]["exclusive_patients"] == 10
        want = 20 if policy == "exclusive_in_episode" else 10
        assert split["conditions"]["Hernia"]["eligible_patients"] == want
        s = EpisodeSampler(split, df, cfg, "test")
        rng = np.random.default_rng(0)
        patient, labels = _maps(df)
        binary_multi, nway_multi = 0, 0
        for _ in range(200):
            b = s.sample(rng, "binary", 2, classes=["Hernia", N])
            n = s.sample(rng, "n_way", 2, classes=["Fibrosis", "Hernia"])
            binary_multi += sum(
                labels[k] == "Fibrosis|Hernia" for k in b.support["Hernia"] + b.query["Hernia"]
            )
            nway_multi += sum("|" in labels[k] for c in n.classes for k in n.support[c] + n.query[c])
            assert all(labels[k] == N for k in b.support[N] + b.query[N])
        assert nway_multi == 0  # a Fibrosis|Hernia scan is ambiguous in a Fibrosis-vs-Hernia episode
        if policy == "exclusive_in_episode":
            assert binary_multi > 0  # ...but is a Hernia example when the other class is normal
        else:
            assert binary_multi == 0  # single_finding never uses multi-label scans


def test_fixed_episodes_reproducible_from_the_seed(study) -> None:
    df, cfg, built = study
    again = build_episodes(df, META, cfg)
    assert [e.to_json() for e in again.test] == [e.to_json() for e in built.test]
    assert [e.to_json() for e in again.val] == [e.to_json() for e in built.val]
    assert again.split == built.split
    other = build_episodes(df, META, cfg.model_copy(update={"seed": 1}))
    assert [e.to_json() for e in other.test] != [e.to_json() for e in built.test]
    # row order of the index does not matter, only the seed
    shuffled = df.sample(frac=1.0, random_state=5).reset_index(drop=True)
    same = build_episodes(shuffled, META, cfg)
    assert [e.to_json() for e in same.test] == [e.to_json() for e in built.test]
    assert same.split == built.split


def test_adding_a_k_shot_keeps_the_other_settings_episodes(study) -> None:
    df, cfg, built = study
    more = build_episodes(df, META, cfg.model_copy(update={"k_shot": [1, 3, 5]}))
    key = lambda e: (e.kind, e.k_shot, e.classes, e.support, e.query)  # noqa: E731
    old = [key(e) for e in built.test]
    new = [key(e) for e in more.test if e.k_shot != 3]
    assert old == new


def test_train_sampler_uses_only_the_train_pool_and_mixes_settings(study) -> None:
    df, cfg, built = study
    sampler = TrainSampler(built.split, df, cfg)
    train_keys = {k for keys in built.split["pools"]["train"].values() for k in keys}
    rng = np.random.default_rng(123)
    seen: Counter = Counter()
    maps = _maps(df)
    for _ in range(200):
        e = sampler.sample(rng)
        seen[(e.kind, e.k_shot)] += 1
        _assert_episode_clean(e, maps, train_keys, e.k_shot, cfg.q_query)
    assert set(seen) == {("binary", 1), ("binary", 5), ("n_way", 1), ("n_way", 5)}
    # the same generator state gives the same episodes (explicit RNG, no global state)
    a = sampler.sample_batch(np.random.default_rng(9), 4)
    b = sampler.sample_batch(np.random.default_rng(9), 4)
    assert [e.to_json() for e in a] == [e.to_json() for e in b]
    assert len({(e.kind, e.k_shot, len(e.classes)) for e in a}) == 1  # one shape per meta-batch


def test_every_eligible_patient_can_be_drawn() -> None:
    # 12 Hernia patients, 6 per episode: over many episodes every patient appears (no silent subset)
    rows = patients(12, "Hernia", 0, scans=3) + patients(12, "Effusion", 100) + patients(30, N, 200)
    df = index_from_rows(rows)
    cfg = EpisodesConfig(
        split={"rare": ["Hernia"], "common": ["Effusion"]}, kinds=["binary"], k_shot=2, q_query=4
    )
    cfg = cfg.model_copy(update={"val_episodes": 0})
    split, _ = build_split(LabelTable.from_index(df, N), cfg)
    eps = fixed_episodes(EpisodeSampler(split, df, cfg, "test"), 200, seed=0)
    used = {k for e in eps for k in e.support["Hernia"] + e.query["Hernia"]}
    assert len(used) == 36  # every scan of every patient
    patient, _ = _maps(df)
    counts = Counter(patient[k] for e in eps for k in e.support["Hernia"])
    # 200 episodes x 2 support patients / 12 patients = 33.3 each (binomial sd ~5.3)
    assert len(counts) == 12 and all(15 <= c <= 52 for c in counts.values()), counts


def test_sampler_refuses_when_classes_share_too_many_patients() -> None:
    # Hernia and Fibrosis patients are the same people (different scans): a 2-way episode needs 2x(k+q)
    rows = patients(6, "Hernia", 0) + patients(6, "Fibrosis", 0) + patients(20, "Effusion", 100)
    rows += patients(20, "Mass", 200) + patients(20, N, 300)
    df = index_from_rows(rows)
    cfg = EpisodesConfig(
        split={"rare": ["Hernia", "Fibrosis"], "common": ["Effusion", "Mass"]},
        kinds=["n_way"],
        n_way=2,
        k_shot=1,
        q_query=3,
        val_episodes=0,
    )
    split, _ = build_split(LabelTable.from_index(df, N), cfg)
    with pytest.raises(DataError, match="not shared with the other classes"):
        EpisodeSampler(split, df, cfg, "test").sample(np.random.default_rng(0), "n_way", 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 3), q=st.integers(1, 3))
def test_episodes_clean_on_random_indices(seed: int, k: int, q: int) -> None:
    rng = np.random.default_rng(seed)
    conds = ["A", "B", "C", "D", "E", "F"]
    rows = []
    for p in range(int(rng.integers(60, 120))):
        for _ in range(int(rng.integers(1, 4))):
            labs = sorted(rng.choice(conds, size=int(rng.integers(0, 3)), replace=False).tolist())
            rows.append((p, "|".join(labs) if labs else N))
    df = index_from_rows(rows)
    cfg = EpisodesConfig(
        split={"common": ["A", "B"], "validation": ["C", "D"], "rare": ["E", "F"]},
        kinds=["binary", "n_way"],
        n_way=2,
        k_shot=k,
        q_query=q,
        val_episodes=3,
        test_episodes=3,
        seed=seed,
        on_insufficient="drop",
    )
    try:
        built = build_episodes(df, META, cfg)
    except DataError:
        return  # refused with a message: too few patients for these sizes
    assert built.audit["passed"], [c for c in built.audit["checks"] if not c["passed"]]
    maps = _maps(df)
    for pool, eps in (("val", built.val), ("test", built.test)):
        keys = {s for lst in built.split["pools"][pool].values() for s in lst}
        for e in eps:
            _assert_episode_clean(e, maps, keys, e.k_shot, q)
