"""Episodes within a group (episodes.group_by, docs/tasks.md): every scan of every episode, fixed or
meta-training, shares one value of the group column; groups too small for an episode hold none; a
condition with enough patients only across groups is short; the audit checks it independently."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from pipeline.episodes.audit import audit
from pipeline.episodes.build import build_episodes
from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.episode import Episode
from pipeline.episodes.labels import LabelTable
from pipeline.episodes.sampler import TrainSampler
from pipeline.episodes.split import build_split
from pipeline.errors import DataError

from .helpers import META, NORMAL, index_from_rows, patients

N = NORMAL
# Omniglot-shaped: alphabets of characters, each character drawn by its own 6 "patients" (drawings).
ALPHABETS = {"A": 4, "B": 6, "C": 2, "D": 5, "E": 5, "F": 4}  # characters per alphabet
SPLIT = {"validation": ["C", "F"], "rare": ["D", "E"]}  # by alphabet; A, B meta-train


def omniglot_like(per_char: int = 6) -> pd.DataFrame:
    rows, group, start = [], [], 0
    for alphabet, n in ALPHABETS.items():
        for c in range(n):
            rows += patients(per_char, f"{alphabet}/c{c}", start)
            group += [alphabet] * per_char
            start += per_char
    df = index_from_rows(rows)
    df["alphabet"] = group
    return df


def _chars(alphabets: list[str]) -> list[str]:
    return [f"{a}/c{c}" for a in alphabets for c in range(ALPHABETS[a])]


def cfg(**over) -> EpisodesConfig:
    base = {
        "split": {k: _chars(v) for k, v in SPLIT.items()},
        "kinds": ["n_way"],
        "n_way": 3,
        "k_shot": 1,
        "q_query": 2,
        "val_episodes": 20,
        "test_episodes": 60,
        "group_by": "alphabet",
    }
    base.update(over)
    return EpisodesConfig.model_validate(base)


def _alphabet_of(df: pd.DataFrame) -> dict[str, str]:
    return dict(zip(df["scan_key"], df["alphabet"]))


def _groups_of(ep: Episode, alphabet: dict[str, str]) -> set[str]:
    return {alphabet[k] for c in ep.classes for k in ep.support[c] + ep.query[c]}


def test_fixed_episodes_stay_within_one_group_and_the_audit_says_so() -> None:
    df = omniglot_like()
    built = build_episodes(df, META, cfg())
    alphabet = _alphabet_of(df)
    for ep in built.val + built.test:
        assert len(_groups_of(ep, alphabet)) == 1, ep.classes
        assert len({c.split("/")[0] for c in ep.classes}) == 1  # the classes too (a character's alphabet)
    # C has 2 characters < n_way 3: no validation episode from it; both test alphabets are used
    assert {_groups_of(e, alphabet).pop() for e in built.val} == {"F"}
    assert Counter(_groups_of(e, alphabet).pop() for e in built.test).keys() == {"D", "E"}
    checks = {c["name"]: c for c in built.audit["checks"]}
    assert checks["test_episodes_within_one_group"]["passed"] and built.audit["passed"]
    assert built.split["group_by"] == "alphabet"
    # split.json lists every group's usable conditions; C's 2 are too few for a 3-way episode
    assert built.split["groups"]["val"] == {"C": _chars(["C"]), "F": _chars(["F"])}
    assert set(built.split["groups"]["train"]) == {"A", "B"}


def test_without_group_by_episodes_mix_groups() -> None:
    df = omniglot_like()
    built = build_episodes(df, META, cfg(group_by=None))
    alphabet = _alphabet_of(df)
    assert any(len(_groups_of(e, alphabet)) > 1 for e in built.test)
    assert "group_by" not in built.split
    assert not any(c["name"].endswith("within_one_group") for c in built.audit["checks"])


def test_audit_catches_an_episode_that_mixes_groups() -> None:
    df = omniglot_like()
    c = cfg()
    built = build_episodes(df, META, c)
    d, e = _chars(["D"])[0], _chars(["E"])[0]
    keys = built.split["pools"]["test"]
    mixed = Episode(
        id=0,
        kind="n_way",
        k_shot=1,
        classes=[d, e, _chars(["D"])[1]],
        support={d: keys[d][:1], e: keys[e][:1], _chars(["D"])[1]: keys[_chars(["D"])[1]][:1]},
        query={d: keys[d][1:3], e: keys[e][1:3], _chars(["D"])[1]: keys[_chars(["D"])[1]][1:3]},
    )
    report = audit(built.split, {"test": [mixed, *built.test[1:]], "val": built.val}, df, c)
    check = next(x for x in report["checks"] if x["name"] == "test_episodes_within_one_group")
    assert not check["passed"] and check["detail"].startswith("1/") and not report["passed"]


def test_meta_training_episodes_stay_within_one_group() -> None:
    df = omniglot_like()
    c = cfg()
    built = build_episodes(df, META, c)
    sampler = TrainSampler(built.split, df, c)
    alphabet = _alphabet_of(df)
    rng = np.random.default_rng(0)
    seen = Counter()
    for _ in range(200):
        ep = sampler.sample(rng)
        (g,) = _groups_of(ep, alphabet)
        seen[g] += 1
    # each usable group equally likely (A has 4 characters, B has 6)
    assert set(seen) == {"A", "B"} and min(seen.values()) > 70


def test_binary_episodes_take_their_normal_scans_from_the_same_group() -> None:
    rows, group = [], []
    for g, conds in (("CT", ["Mass", "Nodule"]), ("XR", ["Mass", "Effusion"])):
        for i, cond in enumerate(conds):
            rows += patients(6, cond, 1000 * (len(group) + 1) + 100 * i)
            group += [g] * 6
        rows += patients(12, N, 5000 + len(group))
        group += [g] * 12
    df = index_from_rows(rows)
    df["modality"] = group
    c = EpisodesConfig(
        split={"rare": ["Mass"], "common": ["Nodule", "Effusion"]},
        kinds=["binary"],
        k_shot=1,
        q_query=2,
        val_episodes=0,
        test_episodes=40,
        group_by="modality",
        normal_fraction={"train": 0.5, "val": 0.0, "test": 0.5},
    )
    built = build_episodes(df, META, c)
    modality = dict(zip(df["scan_key"], df["modality"]))
    assert all(len(_groups_of(e, modality)) == 1 for e in built.test)
    assert {_groups_of(e, modality).pop() for e in built.test} == {"CT", "XR"}  # Mass is in both
    assert built.audit["passed"]


def test_a_condition_with_enough_patients_only_across_groups_is_short() -> None:
    # X has 3 patients in each of two groups: 6 in the pool, but an episode needs 4 within one group
    rows = patients(3, "X", 0) + patients(3, "X", 10) + patients(4, "Y", 20) + patients(4, "Z", 30)
    rows += patients(4, "W", 40) + patients(4, "V", 50)
    df = index_from_rows(rows)
    df["site"] = ["s1"] * 3 + ["s2"] * 3 + ["s1"] * 4 + ["s1"] * 4 + ["s1"] * 4 + ["s1"] * 4
    base = dict(
        split={"rare": ["X", "Y", "Z"], "common": ["W", "V"]},
        kinds=["n_way"],
        n_way=2,
        k_shot=1,
        q_query=3,
        val_episodes=0,
        group_by="site",
    )
    table = LabelTable.from_index(df, N, group_by="site")
    with pytest.raises(DataError) as err:
        build_split(table, EpisodesConfig(**base))
    line = next(x for x in str(err.value).splitlines() if x.strip().startswith("X "))
    assert "TOO FEW in any one site" in line
    split, warnings = build_split(table, EpisodesConfig(**base, on_insufficient="drop"))
    assert split["conditions"]["X"]["split"] == "dropped"
    assert "no site holds the 4" in split["conditions"]["X"]["reason"]
    assert split["conditions"]["X"]["group_eligible_patients"] == {"s1": 3, "s2": 3}
    assert split["groups"]["test"] == {"s1": ["Y", "Z"]}


def test_no_group_large_enough_for_n_way_is_a_clear_error() -> None:
    df = omniglot_like()
    with pytest.raises(DataError) as err:
        build_episodes(df, META, cfg(n_way=6, val_episodes=0))
    msg = str(err.value)
    assert "every episode stays within one alphabet" in msg
    assert "In the test pool no alphabet has that many" in msg
    assert "D: 5, E: 5" in msg and "drop episodes.group_by" in msg


def test_group_column_must_exist_and_be_filled() -> None:
    df = omniglot_like()
    with pytest.raises(DataError, match=r"'script' is not a column of the scan index.*labels.group_columns"):
        build_episodes(df, META, cfg(group_by="script"))
    df.loc[3, "alphabet"] = ""
    with pytest.raises(DataError, match="1 of .* scans have no value"):
        build_episodes(df, META, cfg())
    with pytest.raises(ValueError, match="key or label column"):
        cfg(group_by="patient_key")


def test_a_grouped_sampler_refuses_an_ungrouped_split() -> None:
    df = omniglot_like()
    built = build_episodes(df, META, cfg(group_by=None))
    with pytest.raises(DataError, match="need a split built with episodes.group_by: alphabet"):
        TrainSampler(built.split, df, cfg())


def test_grouped_episodes_reproducible_and_row_order_free() -> None:
    df = omniglot_like()
    a = build_episodes(df, META, cfg())
    b = build_episodes(df.sample(frac=1.0, random_state=3).reset_index(drop=True), META, cfg())
    assert [e.to_json() for e in a.test] == [e.to_json() for e in b.test]
    assert a.split == b.split
