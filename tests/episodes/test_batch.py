"""Batch assembly: tensors hold exactly the store rows of the episode's scans, labels follow `classes`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.episodes.batch import episode_arrays, stack_episodes
from pipeline.episodes.build import build_episodes
from pipeline.episodes.episode import Episode
from pipeline.errors import DataError
from pipeline.ingest.store import ImageStore

from .helpers import META, small_cfg, small_index


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    df = small_index(seed=5, n_images=1500, n_patients=500)
    cfg = small_cfg(
        test_episodes=4, val_episodes=0, q_query=3, split={"rare": ["Edema", "Fibrosis", "Hernia"]}
    )
    built = build_episodes(df, META, cfg)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((len(df), 1, 6, 5)).astype(np.float16)  # (N, C, H, W)
    path = Path(tmp_path_factory.mktemp("store")) / "images.npy"
    # store rows are a permutation of index rows: the mapping must go through store_index
    perm = rng.permutation(len(df))
    index = df.assign(store_index=perm)
    stored = np.empty_like(images)
    stored[perm] = images
    np.save(path, stored)
    store = ImageStore(np.load(path, mmap_mode="r"), index, dict(META))
    truth = {k: images[i].astype(np.float32) for i, k in enumerate(df["scan_key"])}  # scan key -> image
    return built, store, truth


def test_episode_arrays_match_store_rows(setup) -> None:
    built, store, truth = setup
    ep = next(e for e in built.test if e.kind == "n_way" and e.k_shot == 5)
    x_s, y_s, x_q, y_q = episode_arrays(ep, store)
    assert x_s.dtype == torch.float32 and y_s.dtype == torch.int64
    assert x_s.shape == (3 * 5, 1, 6, 5) and x_q.shape == (3 * 3, 1, 6, 5)
    # support ordered class by class, label = position in ep.classes
    assert y_s.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert y_q.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    keys_s = [k for c in ep.classes for k in ep.support[c]]
    keys_q = [k for c in ep.classes for k in ep.query[c]]
    np.testing.assert_array_equal(x_s.numpy(), np.stack([truth[k] for k in keys_s]))
    np.testing.assert_array_equal(x_q.numpy(), np.stack([truth[k] for k in keys_q]))


def test_stack_episodes_is_the_per_episode_arrays_stacked(setup) -> None:
    built, store, _ = setup
    eps = [e for e in built.test if e.kind == "binary" and e.k_shot == 1]
    x_s, y_s, x_q, y_q = stack_episodes(eps, store)
    assert x_s.shape == (len(eps), 2, 1, 6, 5) and y_q.shape == (len(eps), 2 * 3)
    assert x_s.is_contiguous() and x_q.is_contiguous()
    for t, ep in enumerate(eps):
        a_s, b_s, a_q, b_q = episode_arrays(ep, store)
        assert torch.equal(x_s[t], a_s) and torch.equal(y_s[t], b_s)
        assert torch.equal(x_q[t], a_q) and torch.equal(y_q[t], b_q)


def test_stack_refuses_mixed_shapes_and_unknown_keys(setup) -> None:
    built, store, _ = setup
    mixed = [next(e for e in built.test if e.k_shot == 1), next(e for e in built.test if e.k_shot == 5)]
    with pytest.raises(ValueError, match="stack only episodes of one kind"):
        stack_episodes(mixed, store)
    bad = Episode.from_json(built.test[0].to_json())
    bad.query[bad.classes[0]][0] = "feedfacefeedface"
    with pytest.raises(DataError, match="not in the image store"):
        episode_arrays(bad, store)


def test_plain_store_object_without_weakref(setup) -> None:
    built, store, truth = setup
    plain = SimpleNamespace(images=np.asarray(store.images), index=store.index)
    ep = built.test[0]
    x_s, _, _, _ = episode_arrays(ep, plain)
    np.testing.assert_array_equal(
        x_s.numpy(), np.stack([truth[k] for c in ep.classes for k in ep.support[c]])
    )
