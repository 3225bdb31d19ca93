"""Episode samplers: the fixed validation/test episodes and the on-the-fly meta-training episodes are
drawn by the same code (`EpisodeSampler.sample`), each from its own patient pool.

Guarantees of every episode (checked again, independently, by `pipeline.episodes.audit`):
- every scan comes from the sampler's pool (pools are patient-disjoint, see `split.py`);
- a patient gives at most one scan to the whole episode, so support and query come from different
  patients and a patient gives at most one scan per class to the support set;
- a scan is an example of class C only under the multi-label rule (`labels.eligible`);
- classes are balanced: k_shot support and q_query query scans per class.

Cost per episode is O(n_way * (k_shot + q_query)) plus a `Generator.choice` per class (Floyd's
algorithm for small samples, no permutation of the whole pool): eligible scans are grouped by patient
once per (class, other classes) and cached.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.episode import Episode, load_episodes
from pipeline.episodes.labels import LabelTable, eligible
from pipeline.errors import DataError

__all__ = ["EpisodeSampler", "TrainSampler", "fixed_episodes", "load_episodes", "STREAMS"]

# Seed streams of one suite seed: np.random.default_rng([seed, stream, kind, k_shot]).
STREAMS = {"split": 0, "val": 1, "test": 2}
KIND_ID = {"binary": 0, "n_way": 1}
_MAX_TRIES = 50  # redraws of an n_way class set whose classes share too many patients


class _PatientGroups:
    """Eligible scans of one class grouped by patient: patient p_i owns rows[starts[i]:starts[i]+counts[i]]."""

    __slots__ = ("patients", "starts", "counts", "rows")

    def __init__(self, rows: np.ndarray, patient_codes: np.ndarray, scan_rank: np.ndarray):
        # by patient, then scan key: the same groups whatever the row order of the scan index
        order = np.lexsort((scan_rank[rows], patient_codes[rows]))
        self.rows = rows[order]
        pats = patient_codes[self.rows]
        self.patients, self.starts, self.counts = np.unique(pats, return_index=True, return_counts=True)

    def __len__(self) -> int:
        return len(self.patients)

    def draw(
        self, rng: np.random.Generator, need: int, used: np.ndarray, n_used: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """`need` distinct patients not marked in `used` ((P,) bool, `n_used` marked), in random order,
        and one random scan of each -> (rows, patients)."""
        n = len(self.patients)
        m = min(n, need + n_used)  # enough draws to survive excluding every used patient
        if m < need:
            return None
        pick = rng.choice(n, size=m, replace=False)
        if n_used:
            pick = pick[~used[self.patients[pick]]]
            if len(pick) < need:
                return None
            pick = pick[:need]
        scan = self.starts[pick] + rng.integers(0, self.counts[pick])
        return self.rows[scan], self.patients[pick]


class EpisodeSampler:
    """Samples episodes from one pool (`"train"`, `"val"` or `"test"`) of a split (the `split.json` dict).

    Not thread-safe (it keeps a scratch mask of the patients taken by the episode being drawn): use one
    sampler per thread; DataLoader worker processes each get their own copy.
    """

    def __init__(
        self,
        split: dict[str, Any],
        index: pd.DataFrame,
        cfg: EpisodesConfig,
        pool: str = "train",
        table: LabelTable | None = None,
    ):
        if pool not in split.get("pools", {}):
            raise DataError(f"split has no pool '{pool}' (pools: {sorted(split.get('pools', {}))})")
        self.cfg, self.pool = cfg, pool
        self.normal = str(split["normal_label"])
        self.table = table if table is not None else LabelTable.from_index(index, self.normal)
        pool_lists: dict[str, list[str]] = split["pools"][pool]
        self.conditions = sorted(c for c in pool_lists if c != self.normal)
        names = list(pool_lists)
        sizes = [len(pool_lists[n]) for n in names]
        # one lookup for every list of the pool: (sum of list sizes,) rows
        flat = (
            self.table.rows_of([k for n in names for k in pool_lists[n]]) if sum(sizes) else np.empty(0, int)
        )
        self._rows: dict[str, np.ndarray] = {}
        for name, rows in zip(names, np.split(flat, np.cumsum(sizes)[:-1])):
            if (rows < 0).any():
                raise DataError(
                    f"split pool '{pool}' / '{name}' names {int((rows < 0).sum())} scan key(s) missing from the "
                    "scan index: the split and the index come from different ingest runs"
                )
            if name != self.normal and name not in self.table.names:
                raise DataError(
                    f"split pool '{pool}' has condition '{name}' that the scan index does not know"
                )
            self._rows[name] = rows.astype(np.int64)
        self._groups: dict[tuple[str, frozenset[str]], _PatientGroups] = {}
        self._used = np.zeros(
            len(self.table.patient_keys), dtype=bool
        )  # patients taken by the current episode

    def groups(self, cls: str, others: frozenset[str]) -> _PatientGroups:
        """Eligible scans of `cls` in an episode whose other condition classes are `others` (cached)."""
        key = (cls, others if self.cfg.multilabel == "exclusive_in_episode" else frozenset())
        g = self._groups.get(key)
        if g is None:
            rows = self._rows.get(cls)
            if rows is None:
                raise DataError(f"class '{cls}' is not in the {self.pool} pool (it has {self.conditions})")
            if cls != self.normal:
                codes = [self.table.code(o) for o in key[1]]
                rows = rows[eligible(self.table, rows, self.table.code(cls), codes, self.cfg.multilabel)]
            g = _PatientGroups(rows, self.table.patient_codes, self.table.scan_rank)
            self._groups[key] = g
        return g

    def _pick_classes(self, rng: np.random.Generator, kind: str) -> list[str]:
        if kind == "binary":
            return [self.conditions[int(rng.integers(len(self.conditions)))], self.normal]
        if len(self.conditions) < self.cfg.n_way:
            raise DataError(
                f"the {self.pool} pool has {len(self.conditions)} conditions {self.conditions}; "
                f"n_way episodes need {self.cfg.n_way}: lower episodes.n_way"
            )
        # Random class order: label positions carry no class identity across episodes.
        idx = rng.choice(len(self.conditions), size=self.cfg.n_way, replace=False)
        return [self.conditions[int(i)] for i in idx]

    def sample(
        self,
        rng: np.random.Generator,
        kind: str | None = None,
        k_shot: int | None = None,
        classes: list[str] | None = None,
        episode_id: int = 0,
    ) -> Episode:
        """One episode. kind / k_shot default to a random choice among the configured ones; classes
        default to a random condition (binary) or random n_way conditions (n_way)."""
        kind = kind if kind is not None else str(self.cfg.kinds[int(rng.integers(len(self.cfg.kinds)))])
        k = k_shot if k_shot is not None else int(self.cfg.k_shots[int(rng.integers(len(self.cfg.k_shots)))])
        q = self.cfg.q_query
        if kind not in KIND_ID:
            raise DataError(f"unknown episode kind '{kind}' (valid: {sorted(KIND_ID)})")
        if not self.conditions:
            raise DataError(f"the {self.pool} pool has no condition to sample episodes from")
        for _ in range(_MAX_TRIES):
            cls = list(classes) if classes is not None else self._pick_classes(rng, kind)
            conds = frozenset(c for c in cls if c != self.normal)
            groups = [self.groups(c, conds - {c}) for c in cls]
            # Scarcest class first, so that patients shared between classes go where they are needed.
            order = sorted(range(len(cls)), key=lambda i: (len(groups[i]), i))
            used, n_used = self._used, 0  # (P,) scratch mask, cleared below whatever happens
            picked: dict[int, np.ndarray] = {}
            marked: list[np.ndarray] = []
            try:
                for i in order:
                    got = groups[i].draw(rng, k + q, used, n_used)
                    if got is None:
                        break
                    picked[i] = got[0]
                    used[got[1]] = True
                    marked.append(got[1])
                    n_used += len(got[1])
            finally:
                for pats in marked:
                    used[pats] = False
            if len(picked) == len(cls):
                keys = self.table.scan_keys
                return Episode(
                    id=int(episode_id),
                    kind=kind,
                    k_shot=int(k),
                    classes=cls,
                    support={cls[i]: keys[picked[i][:k]].tolist() for i in range(len(cls))},
                    query={cls[i]: keys[picked[i][k:]].tolist() for i in range(len(cls))},
                )
        sizes = {c: len(self.groups(c, frozenset(x for x in cls if x not in (c, self.normal)))) for c in cls}
        raise DataError(
            f"cannot sample a {kind} episode ({k}-shot, {q} query) from the {self.pool} pool for classes {cls}: "
            f"eligible patients per class {sizes}, each class needs {k + q} patients not shared with the other "
            "classes. Lower k_shot/q_query or set episodes.on_insufficient: drop"
        )

    def sample_batch(
        self, rng: np.random.Generator, n: int, kind: str | None = None, k_shot: int | None = None
    ) -> list[Episode]:
        """`n` episodes of one shape (one kind and k_shot drawn once), ready for `batch.stack_episodes`."""
        kind = kind if kind is not None else str(self.cfg.kinds[int(rng.integers(len(self.cfg.kinds)))])
        k = k_shot if k_shot is not None else int(self.cfg.k_shots[int(rng.integers(len(self.cfg.k_shots)))])
        return [self.sample(rng, kind, k, episode_id=i) for i in range(n)]


class TrainSampler(EpisodeSampler):
    """Meta-training episodes, sampled on the fly from the train pool with the caller's generator."""

    def __init__(
        self, split: dict[str, Any], index: pd.DataFrame, cfg: EpisodesConfig, table: LabelTable | None = None
    ):
        super().__init__(split, index, cfg, pool="train", table=table)


def fixed_episodes(sampler: EpisodeSampler, n_per_setting: int, seed: int) -> list[Episode]:
    """The fixed episodes of a pool: `n_per_setting` for every (kind, k_shot) of the config.

    Each setting has its own generator `default_rng([seed, stream, kind, k_shot])`, so adding a k_shot
    to the suite leaves the episodes of the other settings unchanged. Binary episodes cycle through the
    pool's conditions in sorted order, so every rare condition gets the same number of test episodes.
    """
    cfg = sampler.cfg
    stream = STREAMS[sampler.pool]
    out: list[Episode] = []
    for kind in cfg.kinds:
        for k in cfg.k_shots:
            rng = np.random.default_rng([seed, stream, KIND_ID[kind], k])
            for i in range(n_per_setting):
                classes = None
                if kind == "binary":
                    classes = [sampler.conditions[i % len(sampler.conditions)], sampler.normal]
                out.append(sampler.sample(rng, kind, k, classes, episode_id=len(out)))
    return out
