"""Rotated classes (meta_train.train_episodes.rotations, docs/tasks.md): each rotation of a training
condition is a class of its own in n_way meta-training episodes, its images exact rotations of the
stored ones; off by default, where episodes are exactly what they were."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.episodes.batch import stack_episodes
from pipeline.episodes.build import build_episodes
from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.episode import Episode
from pipeline.episodes.sampler import ROTATION_TAG, TrainSampler
from pipeline.errors import DataError

from .helpers import META, NORMAL, index_from_rows, patients

CONDS = ["A", "B", "C"]


def _study(size: tuple[int, int] = (6, 6)):
    rows = []
    for i, c in enumerate(CONDS + ["R1", "R2"]):
        rows += patients(8, c, 100 * i)
    rows += patients(30, NORMAL, 1000)
    df = index_from_rows(rows)
    # every image different and without rotational symmetry (random values)
    images = np.random.default_rng(0).random((len(df), 1, *size)).astype(np.float16)
    cfg = EpisodesConfig(
        split={"common": CONDS, "rare": ["R1", "R2"]},
        kinds=["n_way", "binary"],
        n_way=2,
        k_shot=1,
        q_query=2,
        val_episodes=0,
        test_episodes=4,
    )
    built = build_episodes(df, META, cfg)
    return df, SimpleNamespace(images=images, index=df), cfg, built


def test_rotated_classes_are_classes_of_their_own_with_rotated_images() -> None:
    df, store, cfg, built = _study()
    sampler = TrainSampler(built.split, df, cfg, rotations=[0, 90, 180, 270])
    rng = np.random.default_rng(1)
    names: Counter = Counter()
    same_condition_twice = 0
    for _ in range(60):
        batch = sampler.sample_batch(rng, 4, kind="n_way", k_shot=1)
        x_s, _, x_q, _ = stack_episodes(batch, store)
        for t, ep in enumerate(batch):
            assert len(set(ep.classes)) == len(ep.classes) == cfg.n_way  # distinct classes
            names.update(ep.classes)
            bases = [sampler.base(c)[0] for c in ep.classes]
            same_condition_twice += len(set(bases)) < len(bases)
            pats = [k for c in ep.classes for k in ep.support[c] + ep.query[c]]
            assert len(set(pats)) == len(pats)  # one scan per patient per episode, rotations included
            rows = {k: i for i, k in enumerate(df["scan_key"])}
            for part, x in (("support", x_s[t]), ("query", x_q[t])):
                keys = [k for c in ep.classes for k in getattr(ep, part)[c]]
                turns = [ep.rotations.get(c, 0) // 90 for c in ep.classes for _ in getattr(ep, part)[c]]
                for j, (key, k) in enumerate(zip(keys, turns)):
                    want = np.rot90(store.images[rows[key]].astype(np.float32), k, axes=(-2, -1))
                    assert torch.equal(x[j], torch.from_numpy(want.copy())), (key, k)
    # 3 conditions x 4 rotations = 12 classes, all drawn; rotation 0 keeps the plain name
    assert set(names) == {c if r == 0 else f"{c}{ROTATION_TAG}{r}" for c in CONDS for r in (0, 90, 180, 270)}
    assert same_condition_twice > 0  # two rotations of one character can share an episode, as new classes


def test_rotations_off_by_default_leave_episodes_unchanged() -> None:
    df, _, cfg, built = _study()
    plain = TrainSampler(built.split, df, cfg)
    zero = TrainSampler(built.split, df, cfg, rotations=[0])
    a = plain.sample_batch(np.random.default_rng(5), 6)
    b = zero.sample_batch(np.random.default_rng(5), 6)
    assert [e.to_json() for e in a] == [e.to_json() for e in b]
    assert all(not e.rotations and "rotations" not in e.to_dict() for e in a)


def test_binary_episodes_are_not_rotated() -> None:
    df, _, cfg, built = _study()
    sampler = TrainSampler(built.split, df, cfg, rotations=[0, 180])
    eps = sampler.sample_batch(np.random.default_rng(2), 20, kind="binary", k_shot=1)
    assert all(not e.rotations and e.classes[1] == NORMAL and e.classes[0] in CONDS for e in eps)


def test_rotation_survives_a_json_round_trip() -> None:
    ep = Episode(1, "n_way", 1, ["A@rot90", "B"], {"A@rot90": ["s1"], "B": ["s2"]}, {"A@rot90": ["s3"], "B": ["s4"]},
                 rotations={"A@rot90": 90})  # fmt: skip
    again = Episode.from_json(ep.to_json())
    assert again.rotations == {"A@rot90": 90} and again == ep


def test_quarter_turns_need_square_images() -> None:
    df, store, cfg, built = _study(size=(6, 8))
    sampler = TrainSampler(built.split, df, cfg, rotations=[0, 90])
    rng = np.random.default_rng(0)
    batch = next(
        b
        for b in (sampler.sample_batch(rng, 2, "n_way", 1) for _ in range(50))
        if any(e.rotations for e in b)
    )
    with pytest.raises(DataError, match="need square images"):
        stack_episodes(batch, store)
    half = TrainSampler(built.split, df, cfg, rotations=[0, 180])  # half turns keep the shape
    x_s, *_ = stack_episodes(half.sample_batch(rng, 2, "n_way", 1), store)
    assert x_s.shape[-2:] == (6, 8)


def test_bad_rotations_and_names_that_look_rotated_are_refused() -> None:
    df, _, cfg, built = _study()
    with pytest.raises(DataError, match="subset of"):
        TrainSampler(built.split, df, cfg, rotations=[45])
    split = {**built.split, "pools": {**built.split["pools"]}}
    split["pools"]["train"] = {**split["pools"]["train"], "A@rot90": []}
    with pytest.raises(DataError, match="contain '@rot'"):
        TrainSampler(split, df, cfg, rotations=[0, 90])
