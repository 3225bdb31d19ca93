"""Leakage audit: re-derives, from the scan index alone, every guarantee the split and the samplers
promise, and records each check in `leakage_audit.json`. It shares no sampling code with
`sampler.py` (only the label parsing), so a sampler bug shows up here instead of in a paper.

Checks: scan keys unique; pools patient-disjoint; no scan of a held-out (validation / rare) condition
in an earlier pool (train < val < test); pool lists hold only their split's conditions and scans that
carry them; every fixed episode draws only from its own pool, has the configured shape, has support
and query from different patients, at most one scan per patient per class in the support (and at most
one per patient in the whole episode), no repeated scan, every scan's labels fit its class under
the multi-label rule, and (with episodes.group_by) all its scans share one group value; the
fixed-episode counts match the suite.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.episode import Episode
from pipeline.episodes.labels import LabelTable
from pipeline.errors import DataError

POOL_ORDER = {"train": 0, "val": 1, "test": 2}


class LeakageError(DataError):
    """A leakage check failed: the split or the episodes are not patient-disjoint or not label-clean."""


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _episode_table(episodes: list[Episode]) -> pd.DataFrame:
    """One row per (episode, part, class, scan) for vectorised checks."""
    ep: list[int] = []
    part: list[int] = []  # 0 support, 1 query
    pos: list[int] = []
    key: list[str] = []
    for e_i, e in enumerate(episodes):
        for c_i, c in enumerate(e.classes):
            for p_name, d in ((0, e.support), (1, e.query)):
                ks = d.get(c, [])
                ep.extend([e_i] * len(ks))
                part.extend([p_name] * len(ks))
                pos.extend([c_i] * len(ks))
                key.extend(ks)
    return pd.DataFrame(
        {
            "ep": np.asarray(ep, dtype=np.int64),
            "part": np.asarray(part, dtype=np.int8),
            "pos": np.asarray(pos, dtype=np.int64),
            "scan_key": np.asarray(key, dtype=object),
        }
    )


def audit(
    split: dict[str, Any],
    episodes: dict[str, list[Episode]],
    index: pd.DataFrame,
    cfg: EpisodesConfig,
    table: LabelTable | None = None,
) -> dict[str, Any]:
    """Run every check; returns `{"checks": [...], "passed": bool}` (never raises on a failed check)."""
    normal = str(split["normal_label"])
    t = table if table is not None else LabelTable.from_index(index, normal, group_by=cfg.group_by)
    checks: list[dict[str, Any]] = []
    n_scans = len(t.scan_keys)
    lookup = t.lookup
    checks.append(_check("scan_keys_unique", lookup.is_unique, f"{n_scans} scans"))

    # --- pools -------------------------------------------------------------------------------------
    patient_pools = np.full(len(t.patient_keys), -1, dtype=np.int64)  # -1 none yet
    clash = np.zeros(len(t.patient_keys), dtype=bool)
    unknown_keys = 0
    wrong_split: list[str] = []
    wrong_label: list[str] = []
    cond_split = {n: i["split"] for n, i in split["conditions"].items()}
    scan_pool = np.full(n_scans, -1, dtype=np.int64)
    for pool, lists in split["pools"].items():
        p = POOL_ORDER[pool]
        for name, keys in lists.items():
            rows = t.rows_of(keys)
            unknown_keys += int((rows < 0).sum())
            rows = rows[rows >= 0]
            if name == normal:
                if not t.is_normal[rows].all():
                    wrong_label.append(f"{pool}/{name}")
            else:
                if cond_split.get(name) != pool:
                    wrong_split.append(f"{name} in {pool} pool (split: {cond_split.get(name)})")
                if name not in t.names or not t.findings[rows, t.code(name)].all():
                    wrong_label.append(f"{pool}/{name}")
            pats = np.unique(t.patient_codes[rows])
            prev = patient_pools[pats]
            clash[pats[(prev >= 0) & (prev != p)]] = True
            patient_pools[pats] = np.where(prev >= 0, np.maximum(prev, p), p)
            scan_pool[rows] = p
    checks.append(
        _check("pool_scans_in_index", unknown_keys == 0, f"{unknown_keys} pool scan keys not in the index")
    )
    checks.append(
        _check(
            "pools_patient_disjoint",
            not clash.any(),
            f"{int(clash.sum())} patients in more than one pool; pool patients: "
            + ", ".join(f"{pool}={int((patient_pools == p).sum())}" for pool, p in POOL_ORDER.items()),
        )
    )
    checks.append(
        _check(
            "pool_conditions_match_split",
            not wrong_split,
            "; ".join(wrong_split) or "every pool list in its split",
        )
    )
    checks.append(
        _check(
            "pool_scans_carry_their_label",
            not wrong_label,
            ", ".join(wrong_label) or "all pool scans labelled",
        )
    )

    # A patient of an earlier pool (train < val < test) must have no scan, anywhere in the index, of a
    # condition held out for a later split: meta-training never sees a rare condition's patient.
    held: list[str] = []
    pools_of_scan = patient_pools[t.patient_codes]  # (N,) pool of each scan's patient, -1 if unused
    for name, s in cond_split.items():
        if s not in POOL_ORDER or name not in t.names:
            continue
        has = t.findings[:, t.code(name)]
        bad = has & (pools_of_scan >= 0) & (pools_of_scan < POOL_ORDER[s])
        if bad.any():
            held.append(f"{name} ({s}): {int(bad.sum())} scans of patients in earlier pools")
    checks.append(
        _check("heldout_conditions_absent_from_earlier_pools", not held, "; ".join(held) or "none found")
    )

    # --- fixed episodes ----------------------------------------------------------------------------
    for pool, eps in episodes.items():
        checks.extend(_episode_checks(pool, eps, t, lookup, pools_of_scan, cfg, normal))
        settings = Counter((e.kind, e.k_shot) for e in eps)
        want_n = cfg.val_episodes if pool == "val" else cfg.test_episodes
        want = {(k, s): want_n for k in cfg.kinds for s in cfg.k_shots} if want_n else {}
        checks.append(
            _check(
                f"{pool}_episode_counts",
                dict(settings) == want,
                f"{sum(settings.values())} episodes; per (kind, k_shot): "
                + ", ".join(f"{k}/{s}={n}" for (k, s), n in sorted(settings.items())),
            )
        )
    return {"checks": checks, "passed": all(c["passed"] for c in checks)}


def _episode_checks(
    pool: str,
    eps: list[Episode],
    t: LabelTable,
    lookup: pd.Index,
    pools_of_scan: np.ndarray,
    cfg: EpisodesConfig,
    normal: str,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    df = _episode_table(eps)
    rows = t.rows_of(df["scan_key"].to_numpy(dtype=object))
    missing = int((rows < 0).sum())
    out.append(_check(f"{pool}_episode_scans_in_index", missing == 0, f"{missing} unknown scan keys"))
    df = df[rows >= 0].assign(row=rows[rows >= 0])
    df["patient"] = t.patient_codes[df["row"].to_numpy()]
    n = len(eps)

    outside = int((pools_of_scan[df["row"].to_numpy()] != POOL_ORDER[pool]).sum())
    out.append(
        _check(f"{pool}_episodes_within_pool", outside == 0, f"{outside} scans from outside the {pool} pool")
    )

    # shape: binary = [condition, normal]; n_way = n_way conditions; k per class in support, q in query
    bad_shape = 0
    for e in eps:
        want_c = 2 if e.kind == "binary" else cfg.n_way
        ok = len(e.classes) == want_c and len(set(e.classes)) == want_c
        ok &= (e.classes[-1] == normal) if e.kind == "binary" else (normal not in e.classes)
        ok &= all(len(e.support.get(c, [])) == e.k_shot for c in e.classes)
        ok &= all(len(e.query.get(c, [])) == cfg.q_query for c in e.classes)
        bad_shape += not ok
    out.append(
        _check(f"{pool}_episode_shapes", bad_shape == 0, f"{bad_shape}/{n} episodes with a wrong shape")
    )

    if cfg.group_by is not None:
        # episodes within a group (docs/tasks.md): every scan of an episode has the same group value
        n_groups = pd.Series(t.group_codes[df["row"].to_numpy()]).groupby(df["ep"].to_numpy()).nunique()
        mixed = int((n_groups > 1).sum())
        out.append(
            _check(
                f"{pool}_episodes_within_one_group",
                mixed == 0,
                f"{mixed}/{n} episodes mix values of {cfg.group_by}",
            )
        )

    dup = int(df.duplicated(["ep", "row"]).sum())
    out.append(_check(f"{pool}_no_repeated_scan", dup == 0, f"{dup} repeated scans within episodes"))

    sup, qry = df[df["part"] == 0], df[df["part"] == 1]
    both = sup[["ep", "patient"]].drop_duplicates().merge(qry[["ep", "patient"]].drop_duplicates())
    n_bad = int(both["ep"].nunique())
    out.append(
        _check(
            f"{pool}_support_query_patient_disjoint",
            len(both) == 0,
            f"{n_bad}/{n} episodes share a patient between support and query",
        )
    )
    per_class = int(sup.duplicated(["ep", "pos", "patient"]).sum())
    out.append(
        _check(
            f"{pool}_support_one_scan_per_patient_per_class",
            per_class == 0,
            f"{per_class} extra support scans of a patient within a class",
        )
    )
    per_ep = int(df.duplicated(["ep", "patient"]).sum())
    out.append(
        _check(f"{pool}_one_scan_per_patient_per_episode", per_ep == 0, f"{per_ep} extra scans of a patient")
    )

    # labels under the multi-label rule
    bad_label = 0
    if len(df):
        class_code = np.full(
            (n, max(len(e.classes) for e in eps)), -2, dtype=np.int64
        )  # -1 normal, -2 unknown
        ep_mask = np.zeros((n, len(t.names)), dtype=bool)  # the episode's condition classes
        for i, e in enumerate(eps):
            for j, c in enumerate(e.classes):
                if c == normal:
                    class_code[i, j] = -1
                elif c in t.names:
                    class_code[i, j] = t.code(c)
                    ep_mask[i, t.code(c)] = True
        r, ep_i = df["row"].to_numpy(), df["ep"].to_numpy()
        code = class_code[ep_i, df["pos"].to_numpy()]
        f = t.findings[r]  # (rows, L)
        is_cond = code >= 0
        label_ok = np.where(code == -1, t.is_normal[r], False)
        own = np.zeros(len(r), dtype=bool)
        own[is_cond] = f[is_cond, code[is_cond]]
        if cfg.multilabel == "single_finding":
            clean = f.sum(axis=1) == 1
        else:
            other = ep_mask[ep_i].copy()
            other[is_cond, code[is_cond]] = False
            clean = ~(f & other).any(axis=1)
        label_ok |= is_cond & own & clean
        bad_label = int((~label_ok).sum())
    out.append(
        _check(
            f"{pool}_labels_match_classes",
            bad_label == 0,
            f"{bad_label} scans whose labels do not fit their class ({cfg.multilabel})",
        )
    )
    return out
