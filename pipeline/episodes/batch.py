"""Episode -> tensors, read from the memory-mapped image store.

Scan keys are mapped to store rows by the store's `RowMap` (pipeline/ingest/store.py), and a meta-batch
is read with one sorted fancy-index into the memmap (sequential-ish reads, each image read once even if
two episodes share it), converted to float32 after the device copy (half the bytes moved).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.episodes.episode import Episode
from pipeline.errors import DataError
from pipeline.ingest.store import RowMap, StoreLike


def _keys_and_labels(ep: Episode, part: dict[str, list[str]]) -> tuple[list[str], np.ndarray, list[int]]:
    """Scan keys, labels and quarter turns (rotation / 90) of one part, class by class."""
    keys: list[str] = []
    labels: list[int] = []
    turns: list[int] = []
    for i, c in enumerate(ep.classes):  # class by class: support is ordered [class 0 x k, class 1 x k, ...]
        keys.extend(part[c])
        labels.extend([i] * len(part[c]))
        turns.extend([ep.rotations.get(c, 0) // 90] * len(part[c]))
    return keys, np.asarray(labels, dtype=np.int64), turns


def _rotate(x: torch.Tensor, turns: np.ndarray) -> torch.Tensor:
    """Rotate row i of x (n, C, ..., H, W) by turns[i] quarter turns counterclockwise, in the image
    plane (the last two axes), for rotated classes (docs/tasks.md "Rotated classes")."""
    if not turns.any():
        return x
    if (turns % 2).any() and x.shape[-1] != x.shape[-2]:
        raise DataError(
            f"rotations by 90 or 270 degrees need square images, the store holds {tuple(x.shape[-2:])}: "
            "use meta_train.train_episodes.rotations [0, 180] or a square preprocess.image_size"
        )
    for t in (1, 2, 3):  # x is this call's own tensor (gathered fresh): rotate in place
        idx = torch.from_numpy(np.flatnonzero(turns == t)).to(x.device)
        if len(idx):
            x[idx] = torch.rot90(x[idx], t, dims=(-2, -1))
    return x


def _gather(store: StoreLike, rows: np.ndarray, device: torch.device | str | None) -> torch.Tensor:
    """(len(rows), *image_shape) float32, each distinct row read once, in ascending order."""
    uniq, inv = np.unique(rows, return_inverse=True)
    data = np.asarray(store.images[uniq])  # one sorted read from the memmap (storage dtype, float16)
    # Back to the requested order while still float16 (numpy take: half the bytes of a float32 gather).
    data = np.take(data, inv, axis=0)
    t = torch.from_numpy(data)
    if device is not None:
        t = t.to(device, non_blocking=True)  # copy float16, convert on the device
    return t.to(torch.float32)


def episode_arrays(
    ep: Episode, store: StoreLike, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_s, y_s, x_q, y_q): x float32 (n, C, H, W) or (n, C, D, H, W); y int64 = position in `ep.classes`."""
    x_s, y_s, x_q, y_q = stack_episodes([ep], store, device)
    return x_s[0], y_s[0], x_q[0], y_q[0]


def stack_episodes(
    episodes: list[Episode], store: StoreLike, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A meta-batch of equal-shape episodes: x_s (T, n_way*k_shot, C, H, W), y_s (T, n_way*k_shot),
    x_q (T, n_way*q_query, C, H, W), y_q (T, n_way*q_query)."""
    if not episodes:
        raise ValueError("stack_episodes needs at least one episode")
    rmap = RowMap.of(store)
    keys_s: list[str] = []
    keys_q: list[str] = []
    turns_s: list[int] = []
    turns_q: list[int] = []
    ys, yq = [], []
    shape: tuple[int, int] | None = None
    for ep in episodes:
        ks, ls, ts = _keys_and_labels(ep, ep.support)
        kq, lq, tq = _keys_and_labels(ep, ep.query)
        turns_s.extend(ts)
        turns_q.extend(tq)
        if shape is None:
            shape = (len(ks), len(kq))
        elif shape != (len(ks), len(kq)):
            raise ValueError(
                f"episode {ep.id} has {len(ks)} support / {len(kq)} query scans, the first had {shape}: "
                "stack only episodes of one kind, n_way, k_shot and q_query (TrainSampler.sample_batch)"
            )
        keys_s.extend(ks)
        keys_q.extend(kq)
        ys.append(ls)
        yq.append(lq)
    assert shape is not None
    n_s, n_q = shape
    t = len(episodes)
    # All supports, then all queries: both halves are contiguous views of one gathered tensor.
    x = _gather(store, rmap(keys_s + keys_q), device)  # (T*n_s + T*n_q, C, H, W)
    x = _rotate(x, np.asarray(turns_s + turns_q, dtype=np.int64))
    x_s = x[: t * n_s].reshape(t, n_s, *x.shape[1:])
    x_q = x[t * n_s :].reshape(t, n_q, *x.shape[1:])
    y_s = torch.from_numpy(np.stack(ys)).to(x.device)
    y_q = torch.from_numpy(np.stack(yq)).to(x.device)
    return x_s, y_s, x_q, y_q
