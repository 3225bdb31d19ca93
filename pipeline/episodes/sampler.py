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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artifacts import SplitFile
from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.episode import Episode, load_episodes
from pipeline.episodes.labels import LabelTable, eligible
from pipeline.errors import DataError

__all__ = ["EpisodeSampler", "TrainSampler", "fixed_episodes", "load_episodes", "STREAMS"]

# Seed streams of one suite seed: np.random.default_rng([seed, stream, kind, k_shot]).
STREAMS = {"split": 0, "val": 1, "test": 2}
KIND_ID = {"binary": 0, "n_way": 1}
_MAX_TRIES = 50  # redraws of an n_way class set whose classes share too many patients
# Class augmentation by rotation (meta-training only, docs/tasks.md "Rotated classes"): the class of
# condition C rotated by 90 degrees is named "C@rot90"; rotation 0 keeps the plain name.
ROTATION_TAG = "@rot"
ROTATIONS = (0, 90, 180, 270)


def rotated_name(condition: str, degrees: int) -> str:
    return condition if degrees == 0 else f"{condition}{ROTATION_TAG}{degrees}"


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
    """Samples episodes from one pool (`"train"`, `"val"` or `"test"`) of a split (`split.json`'s model,
    `pipeline.artifacts.SplitFile`, or the dict `build_split` returns).

    Not thread-safe (it keeps a scratch mask of the patients taken by the episode being drawn): use one
    sampler per thread; DataLoader worker processes each get their own copy.
    """

    def __init__(
        self,
        split: SplitFile | Mapping[str, Any],
        index: pd.DataFrame,
        cfg: EpisodesConfig,
        pool: str = "train",
        table: LabelTable | None = None,
        rotations: Sequence[int] = (0,),
    ):
        # split.json's model (pipeline/artifacts.py); a plain dict (build_split's) is validated into it
        split = split if isinstance(split, SplitFile) else SplitFile.model_validate(split)
        if pool not in split.pools:
            raise DataError(f"split has no pool '{pool}' (pools: {sorted(split.pools)})")
        self.cfg, self.pool = cfg, pool
        self.normal = split.normal_label
        if table is None:
            table = LabelTable.from_index(index, self.normal, group_by=cfg.group_by)
        elif cfg.group_by is not None and table.group_by != cfg.group_by:
            raise DataError(
                f"the label table is grouped by {table.group_by!r}, the episodes by {cfg.group_by!r}"
            )
        self.table = table
        pool_lists: dict[str, list[str]] = split.pools[pool]
        self.conditions = sorted(c for c in pool_lists if c != self.normal)
        # Episodes within a group (docs/tasks.md): per group value, the conditions that can fill a class
        # inside it (split.json "groups", written by the episodes stage with the same group_by).
        self.by_group: dict[str, list[str]] = {}
        if cfg.group_by is not None:
            if split.group_by != cfg.group_by or split.groups is None:
                raise DataError(
                    f"episodes grouped by '{cfg.group_by}' need a split built with episodes.group_by: "
                    f"{cfg.group_by} (this split.json has group_by {split.group_by!r}); re-run episodes"
                )
            self.by_group = {g: list(c) for g, c in split.groups.get(pool, {}).items() if c}
        rots = tuple(sorted(set(int(r) for r in rotations)))
        if not rots or any(r not in ROTATIONS for r in rots):
            raise DataError(
                f"rotations must be a non-empty subset of {list(ROTATIONS)}, got {list(rotations)}"
            )
        self.rotations = rots
        self._base: dict[str, tuple[str, int]] = {}  # class name -> (condition, degrees)
        if rots != (0,):
            clash = [c for c in self.conditions if ROTATION_TAG in c]
            if clash:
                raise DataError(
                    f"conditions {clash[:3]} contain '{ROTATION_TAG}', which names rotated classes: rename them "
                    "or leave meta_train.train_episodes.rotations off"
                )
            self._base = {rotated_name(c, r): (c, r) for c in self.conditions for r in rots}
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
        self._groups: dict[tuple[str, frozenset[str], str | None], _PatientGroups] = {}
        self._used = np.zeros(
            len(self.table.patient_keys), dtype=bool
        )  # patients taken by the current episode

    def groups(self, cls: str, others: frozenset[str], group: str | None = None) -> _PatientGroups:
        """Eligible scans of `cls` in an episode whose other condition classes are `others`, inside
        `group` (a value of cfg.group_by; None = the whole pool) (cached)."""
        key = (cls, others if self.cfg.multilabel == "exclusive_in_episode" else frozenset(), group)
        g = self._groups.get(key)
        if g is None:
            rows = self._rows.get(cls)
            if rows is None:
                raise DataError(f"class '{cls}' is not in the {self.pool} pool (it has {self.conditions})")
            if cls != self.normal:
                codes = [self.table.code(o) for o in key[1]]
                rows = rows[eligible(self.table, rows, self.table.code(cls), codes, self.cfg.multilabel)]
            if group is not None:
                rows = rows[self.table.group_codes[rows] == self.table.group_names.index(group)]
            g = _PatientGroups(rows, self.table.patient_codes, self.table.scan_rank)
            self._groups[key] = g
        return g

    def base(self, name: str) -> tuple[str, int]:
        """(condition, rotation in degrees) of a class name (rotation 0 unless rotations are on)."""
        return self._base.get(name, (name, 0))

    def _n_way_groups(self) -> list[str]:
        return sorted(g for g, c in self.by_group.items() if len(c) * len(self.rotations) >= self.cfg.n_way)

    def _pick_classes(self, rng: np.random.Generator, kind: str) -> tuple[list[str], str | None]:
        group = None
        conditions = self.conditions
        if self.cfg.group_by is not None:
            # a group first (each usable group equally likely), then the classes inside it
            usable = self._n_way_groups() if kind == "n_way" else sorted(self.by_group)
            if not usable:
                raise DataError(
                    f"no {self.cfg.group_by} of the {self.pool} pool holds enough conditions for a {kind} "
                    f"episode (usable conditions per {self.cfg.group_by}: "
                    f"{ {g: len(c) for g, c in self.by_group.items()} }); lower the episodes' n_way"
                )
            group = usable[int(rng.integers(len(usable)))]
            conditions = self.by_group[group]
        if kind == "binary":
            return [conditions[int(rng.integers(len(conditions)))], self.normal], group
        n_rot = len(self.rotations)
        if len(conditions) * n_rot < self.cfg.n_way:
            raise DataError(
                f"the {self.pool} pool has {len(conditions)} conditions {conditions[:10]}"
                + (f" x {n_rot} rotations" if n_rot > 1 else "")
                + f"; n_way episodes need {self.cfg.n_way}: lower episodes.n_way"
                + (" (or meta_train.train_episodes.n_way)" if self.pool == "train" else "")
            )
        # Random class order: label positions carry no class identity across episodes.
        idx = rng.choice(len(conditions) * n_rot, size=self.cfg.n_way, replace=False)
        if n_rot == 1:
            return [conditions[int(i)] for i in idx], group
        return [rotated_name(conditions[int(i) // n_rot], self.rotations[int(i) % n_rot]) for i in idx], group

    def _group_for(self, rng: np.random.Generator, classes: list[str]) -> str | None:
        """A group for given classes: one, drawn at random, in which all their conditions are usable."""
        if self.cfg.group_by is None:
            return None
        conds = {self.base(c)[0] for c in classes if c != self.normal}
        fits = sorted(g for g, c in self.by_group.items() if conds <= set(c))
        if not fits:
            raise DataError(
                f"no {self.cfg.group_by} of the {self.pool} pool holds enough patients of all of {sorted(conds)}"
            )
        return fits[int(rng.integers(len(fits)))]

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
            if classes is not None:
                cls, group = list(classes), self._group_for(rng, list(classes))
            else:
                cls, group = self._pick_classes(rng, kind)
            base = [self.base(c)[0] for c in cls]
            conds = frozenset(b for b in base if b != self.normal)
            groups = [self.groups(b, conds - {b}, group) for b in base]
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
                    rotations={c: self.base(c)[1] for c in cls if self.base(c)[1]},
                )
        sizes = {c: len(groups[i]) for i, c in enumerate(cls)}
        where = f" ({self.cfg.group_by} {group})" if group is not None else ""
        raise DataError(
            f"cannot sample a {kind} episode ({k}-shot, {q} query) from the {self.pool} pool{where} for classes {cls}: "
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
    """Meta-training episodes, sampled on the fly from the train pool with the caller's generator.

    `rotations` (degrees, e.g. [0, 90, 180, 270]): class augmentation for benchmark reproduction (Omniglot,
    docs/tasks.md "Rotated classes"): each rotation of a condition is a class of its own in n_way
    episodes, its images rotated by `batch.stack_episodes`. Off ([0]) by default."""

    def __init__(
        self,
        split: SplitFile | Mapping[str, Any],
        index: pd.DataFrame,
        cfg: EpisodesConfig,
        table: LabelTable | None = None,
        rotations: Sequence[int] = (0,),
    ):
        super().__init__(split, index, cfg, pool="train", table=table, rotations=rotations)


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
