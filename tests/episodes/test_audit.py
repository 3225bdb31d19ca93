"""The leakage audit passes on built episodes and catches each kind of violation when injected."""

from __future__ import annotations

import copy

import pytest

from pipeline.episodes.audit import audit
from pipeline.episodes.build import build_episodes
from pipeline.episodes.episode import Episode

from .helpers import META, NORMAL, small_cfg, small_index


@pytest.fixture(scope="module")
def built():
    df = small_index(seed=11)
    cfg = small_cfg(test_episodes=10, val_episodes=5)
    return df, cfg, build_episodes(df, META, cfg)


def _failed(report) -> set[str]:
    return {c["name"] for c in report["checks"] if not c["passed"]}


def _run(built, split=None, val=None, test=None):
    df, cfg, b = built
    return audit(
        split or b.split, {"val": val if val is not None else b.val, "test": test or b.test}, df, cfg
    )


def test_clean_build_passes_every_check(built) -> None:
    report = built[2].audit
    assert report["passed"] and not _failed(report)
    names = {c["name"] for c in report["checks"]}
    assert {
        "pools_patient_disjoint",
        "test_support_query_patient_disjoint",
        "test_labels_match_classes",
    } <= names


def test_patient_in_two_pools_is_caught(built) -> None:
    df, _, b = built
    split = copy.deepcopy(b.split)
    # move one test-pool Hernia scan's patient into the train pool through another scan of theirs
    hernia_key = split["pools"]["test"]["Hernia"][0]
    patient = df.loc[df["scan_key"] == hernia_key, "patient_key"].iloc[0]
    others = df[(df["patient_key"] == patient) & (df["labels"] == NORMAL)]
    key = others["scan_key"].iloc[0] if len(others) else hernia_key
    split["pools"]["train"][NORMAL].append(key)
    failed = _failed(_run(built, split=split))
    # the patient is now in the train and the test pools; moving the Hernia scan itself (when the patient
    # has no normal scan) also puts a scan under a label it does not carry
    want = {"pools_patient_disjoint"} | (set() if len(others) else {"pool_scans_carry_their_label"})
    assert failed == want


def test_rare_condition_in_training_pool_is_caught(built) -> None:
    df, _, b = built
    split = copy.deepcopy(b.split)
    key = split["pools"]["test"]["Hernia"][0]
    split["pools"]["test"]["Hernia"].remove(key)
    # the patient's scans all leave the test pool, one shows up under a train condition list
    patient = df.loc[df["scan_key"] == key, "patient_key"].iloc[0]
    for lists in split["pools"]["test"].values():
        lists[:] = [k for k in lists if df.loc[df["scan_key"] == k, "patient_key"].iloc[0] != patient]
    split["pools"]["train"][NORMAL].append(key)
    failed = _failed(_run(built, split=split))
    assert {"heldout_conditions_absent_from_earlier_pools", "pool_scans_carry_their_label"} <= failed


def test_support_query_sharing_a_patient_is_caught(built) -> None:
    df, _, b = built
    test = [Episode.from_json(e.to_json()) for e in b.test]
    ep = test[0]
    c = ep.classes[0]
    patient = df.loc[df["scan_key"] == ep.support[c][0], "patient_key"].iloc[0]
    same = df[(df["patient_key"] == patient) & (df["scan_key"] != ep.support[c][0])]
    ep.query[c][0] = same["scan_key"].iloc[0] if len(same) else ep.support[c][0]
    failed = _failed(_run(built, test=test))
    assert "test_support_query_patient_disjoint" in failed


def test_wrong_label_and_foreign_pool_are_caught(built) -> None:
    _, _, b = built
    test = [Episode.from_json(e.to_json()) for e in b.test]
    binary = next(e for e in test if e.kind == "binary")
    # a train-pool scan of a common condition passed off as normal in a test episode
    binary.query[NORMAL][0] = b.split["pools"]["train"]["Effusion"][0]
    failed = _failed(_run(built, test=test))
    assert {"test_labels_match_classes", "test_episodes_within_pool"} <= failed


def test_ambiguous_multilabel_scan_in_n_way_is_caught(built) -> None:
    df, _, b = built
    test = [Episode.from_json(e.to_json()) for e in b.test]
    labels = dict(zip(df["scan_key"], df["labels"]))
    # an n-way episode and a test-pool scan carrying two of its classes (ambiguous label)
    hit = next(
        (e, a, k)
        for e in test
        if e.kind == "n_way"
        for a in e.classes
        for k in b.split["pools"]["test"][a]
        if len(set(labels[k].split("|")) & set(e.classes)) > 1
    )
    ep, a, key = hit
    ep.query[a][0] = key
    assert "test_labels_match_classes" in _failed(_run(built, test=test))


def test_wrong_episode_count_and_shape_are_caught(built) -> None:
    _, _, b = built
    test = [Episode.from_json(e.to_json()) for e in b.test[:-1]]
    test[0].support[test[0].classes[0]].pop()
    failed = _failed(_run(built, test=test))
    assert {"test_episode_counts", "test_episode_shapes"} <= failed
