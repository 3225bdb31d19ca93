"""Condition split (common / validation / rare) and patient-disjoint pools.

Pools. Every patient belongs to exactly one pool, `train`, `val` or `test`:
  1. a patient with any scan of a rare (meta-test) condition -> test;
  2. otherwise, with any scan of a validation condition -> val;
  3. otherwise, with any scan of a common condition -> train;
  4. otherwise (normal-only, or only excluded findings) -> shared by `normal_fraction`, by a seeded
     permutation of the sorted patient keys.
Held-out conditions take priority because they are scarce: a patient with Effusion and Hernia scans
serves the Hernia test, and meta-training never sees a scan of a patient that the test uses, nor any
scan showing a rare condition. The price is that some common-condition scans of those patients go
unused; `split.json` reports, per condition, how many images and patients its pool keeps.

A pool lists, for each condition of its own split, every scan in the pool that carries the condition
(multi-label scans appear under each of their conditions; the samplers apply the multi-label rule per
episode), and under the normal label every scan whose labels are exactly the normal label.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import numpy as np

from pipeline.episodes.config import EpisodesConfig, SplitConfig
from pipeline.episodes.labels import LabelTable, eligible
from pipeline.errors import ConfigError, DataError

POOLS = ("train", "val", "test")
_LIST_TO_POOL = {"common": "train", "validation": "val", "rare": "test"}
POOL_RULE = (
    "patients with a rare-condition scan -> test; else with a validation-condition scan -> val; "
    "else with a common-condition scan -> train; else split by normal_fraction (seeded)"
)


def split_rng(seed: int) -> np.random.Generator:
    """The generator that shares normal-only patients between pools (stream 0 of the suite seed)."""
    return np.random.default_rng([seed, 0])


def validate_condition_names(split: SplitConfig, names: list[str], normal_label: str) -> None:
    """Fail on condition names the scan index does not know, with the valid names and the closest match."""
    problems = []
    for key in ("common", "validation", "rare", "exclude"):
        for name in getattr(split, key):
            if name == normal_label:
                problems.append(
                    f"  - episodes.split.{key}: '{name}' is the normal label, not a condition "
                    "(normal scans are the negative class of binary episodes)"
                )
            elif name not in names:
                close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
                if not close:  # case or separator slips: "pleural thickening" vs "Pleural_Thickening"
                    folded = {n.lower().replace("_", " "): n for n in names}
                    hit = folded.get(name.lower().replace("_", " "))
                    close = [hit] if hit else []
                hint = f" Did you mean '{close[0]}'?" if close else ""
                problems.append(f"  - episodes.split.{key}: unknown condition '{name}'.{hint}")
    if problems:
        raise ConfigError(
            "unknown condition name(s) in the task suite:\n"
            + "\n".join(problems)
            + f"\n  Valid conditions in this scan index: {', '.join(names)} (normal label: '{normal_label}')"
        )


def assign_conditions(split: SplitConfig, names: list[str], patients: np.ndarray) -> dict[str, str]:
    """Condition -> "train" | "val" | "test" | "excluded" | "absent" (explicit lists, then the rules)."""
    out: dict[str, str] = {}
    for key, pool in _LIST_TO_POOL.items():
        for name in getattr(split, key):
            out[name] = pool
    for name in split.exclude:
        out[name] = "excluded"
    for j, name in enumerate(names):
        if name in out:
            continue
        n = int(patients[j])
        if n == 0:
            out[name] = "absent"
        elif split.rare_below_patients is not None and n < split.rare_below_patients:
            out[name] = "test"
        elif split.validation_below_patients is not None and n < split.validation_below_patients:
            out[name] = "val"
        else:
            out[name] = "train"
    return out


def assign_patient_pools(
    table: LabelTable, assignment: dict[str, str], cfg: EpisodesConfig, rng: np.random.Generator
) -> np.ndarray:
    """(P,) int8 pool of every patient code: 0 train, 1 val, 2 test (rule in the module docstring)."""
    rank = np.zeros(len(table.names), dtype=np.int8)  # 0 unused, 1 train, 2 val, 3 test
    for j, name in enumerate(table.names):
        rank[j] = {"train": 1, "val": 2, "test": 3}.get(assignment.get(name, ""), 0)
    # (N,) highest-priority split among each scan's findings, then max over each patient's scans
    scan_rank = (table.findings * rank[None, :]).max(axis=1) if len(rank) else np.zeros(len(table.scan_keys))
    patient_rank = np.zeros(len(table.patient_keys), dtype=np.int8)
    np.maximum.at(patient_rank, table.patient_codes, scan_rank.astype(np.int8))
    pool = (patient_rank - 1).astype(np.int8)

    rest = np.flatnonzero(patient_rank == 0)  # sorted codes = sorted patient keys
    rest = rest[rng.permutation(len(rest))]
    frac = cfg.normal_fraction
    n_train = int(round(frac.train * len(rest)))
    n_val = int(round(frac.val * len(rest)))
    n_val = min(n_val, len(rest) - n_train)
    pool[rest[:n_train]] = 0
    pool[rest[n_train : n_train + n_val]] = 1
    pool[rest[n_train + n_val :]] = 2
    return pool


def _n_patients(codes: np.ndarray) -> int:
    return int(len(np.unique(codes)))


def build_split(table: LabelTable, cfg: EpisodesConfig) -> tuple[dict, list[str]]:
    """The content of `split.json` and the warnings to show (dropped conditions).

    Raises DataError, with a table of every condition's patient count against what an episode needs,
    when a condition (or a pool's normal class) has too few patients and `on_insufficient` is "fail".
    """
    validate_condition_names(cfg.split, table.names, table.normal_label)
    if cfg.group_by is not None and table.group_by != cfg.group_by:
        raise ValueError(f"the label table is grouped by {table.group_by!r}, the suite by {cfg.group_by!r}")
    images, patients = table.condition_counts()
    assignment = assign_conditions(cfg.split, table.names, patients)
    patient_pool = assign_patient_pools(table, assignment, cfg, split_rng(cfg.seed))
    scan_pool = patient_pool[table.patient_codes]  # (N,)
    need = cfg.max_patients_per_class
    # Which pools must hold full episodes: train (meta-training), test, and val when asked for.
    used_pools = ["train", "test"] + (["val"] if cfg.val_episodes > 0 else [])

    conditions: dict[str, dict] = {}
    rows_of: dict[str, np.ndarray] = {}
    short: list[str] = []
    for j, name in enumerate(table.names):
        where = assignment[name]
        info: dict = {"split": where, "images": int(images[j]), "patients": int(patients[j])}
        if where in POOLS:
            p = POOLS.index(where)
            info["pool"] = where  # stays when the condition is dropped: where its patients are
            rows = np.flatnonzero(table.findings[:, j] & (scan_pool == p))
            rows_of[name] = rows
            info["pool_images"] = int(len(rows))
            info["pool_patients"] = _n_patients(table.patient_codes[rows])
            # Patients that can serve this condition in an episode of every configured kind. binary:
            # the multi-label rule against the normal class. n_way: against the n_way - 1 other
            # conditions of its split that co-occur with it least (the sampler redraws a class set that
            # cannot be filled). `exclusive_patients`: no other condition of the split at all.
            others = [table.code(n) for n, s in assignment.items() if s == where and n != name]
            per_kind = []
            ok_every = np.ones(len(rows), dtype=bool)  # eligible in an episode of every configured kind
            for kind in cfg.kinds:
                with_ = []
                if kind == "n_way" and others:
                    co = table.findings[rows][:, others].sum(axis=0)  # (len(others),) co-occurring scans
                    with_ = [others[i] for i in np.argsort(co, kind="stable")[: cfg.n_way - 1]]
                ok = eligible(table, rows, j, with_, cfg.multilabel)
                ok_every &= ok
                per_kind.append(_n_patients(table.patient_codes[rows[ok]]))
            info["eligible_patients"] = min(per_kind)
            if cfg.group_by is not None:
                # within-group episodes: the patients it has inside each group (docs/tasks.md)
                info["group_eligible_patients"] = _per_group_patients(table, rows[ok_every])
            ok = eligible(table, rows, j, others, cfg.multilabel)
            info["exclusive_patients"] = _n_patients(table.patient_codes[rows[ok]])
            if where in used_pools and info["eligible_patients"] < need:
                short.append(name)
        elif where == "excluded":
            info["split"] = "dropped"
            info["reason"] = "listed in episodes.split.exclude"
        else:
            info["split"] = "dropped"
            info["reason"] = "no scan in the index carries it"
        conditions[name] = info

    normal: dict[str, dict] = {}
    normal_short: list[str] = []
    for p, pool in enumerate(POOLS):
        rows = np.flatnonzero(table.is_normal & (scan_pool == p))
        rows_of[f"normal:{pool}"] = rows
        n_pat = _n_patients(table.patient_codes[rows])
        normal[pool] = {"images": int(len(rows)), "patients": n_pat}
        if "binary" in cfg.kinds and pool in used_pools and n_pat < need:
            normal_short.append(pool)

    group_normal: dict[str, dict[str, int]] = {}
    if cfg.group_by is not None:
        for pool in POOLS:
            group_normal[pool] = _per_group_patients(table, rows_of[f"normal:{pool}"])
        for name, info in conditions.items():
            if name in short or info.get("pool") not in used_pools:
                continue
            if not _usable_groups(info, group_normal[info["pool"]], need, cfg):
                short.append(name)  # enough patients in its pool, but not inside any one group

    def causes() -> list[str]:
        lost = {conditions[n]["pool"] for n in short} | set(normal_short)
        return pool_causes(table, assignment, patient_pool, cfg, [p for p in used_pools if p in lost])

    warnings: list[str] = []
    if normal_short or (short and cfg.on_insufficient == "fail"):
        raise DataError(
            _shortage_message(conditions, normal, need, cfg, short, normal_short, used_pools, causes())
        )
    for name in short:
        info = conditions[name]
        info["reason"] = (
            f"{info['eligible_patients']} eligible patients in the {info['split']} pool, "
            f"an episode needs {need} (k_shot {max(cfg.k_shots)} + q_query {cfg.q_query})"
        )
        if info["eligible_patients"] >= need:
            info["reason"] = _group_shortfall(info, need, cfg)
        info["split"] = "dropped"
        warnings.append(f"dropped condition '{name}': {info['reason']}")

    _check_enough_conditions(
        conditions,
        cfg,
        used_pools,
        short,
        lambda pool: (
            _count_table(conditions, normal, need, cfg, short, [], used_pools)
            + pool_causes(table, assignment, patient_pool, cfg, [pool])
        ),
    )
    groups: dict[str, dict[str, list[str]]] = {}
    if cfg.group_by is not None:
        for pool in POOLS:
            by_group: dict[str, list[str]] = {}
            for name, info in sorted(conditions.items()):
                if info["split"] == pool:
                    for g in _usable_groups(info, group_normal[pool], need, cfg):
                        by_group.setdefault(g, []).append(name)
            groups[pool] = dict(sorted(by_group.items()))
        _check_enough_in_a_group(groups, group_normal, cfg, used_pools, need)

    def keys(rows: np.ndarray) -> list[str]:  # sorted by scan key: split.json ignores the index row order
        return table.scan_keys[rows[np.argsort(table.scan_rank[rows])]].tolist()

    pools: dict[str, dict[str, list[str]]] = {}
    for pool in POOLS:
        entry = {name: keys(rows_of[name]) for name, info in conditions.items() if info["split"] == pool}
        entry[table.normal_label] = keys(rows_of[f"normal:{pool}"])
        pools[pool] = entry
    pool_patients = {pool: int((patient_pool == p).sum()) for p, pool in enumerate(POOLS)}
    pool_images = {pool: int((scan_pool == p).sum()) for p, pool in enumerate(POOLS)}
    split = {
        "normal_label": table.normal_label,
        "conditions": conditions,
        "normal": normal,
        "pools": pools,
        "pool_patients": pool_patients,
        "pool_images": pool_images,
        "pool_rule": POOL_RULE,
        "kinds": list(cfg.kinds),
        "k_shots": cfg.k_shots,
        "q_query": cfg.q_query,
        "n_way": cfg.n_way,
        "multilabel": cfg.multilabel,
        "patients_needed_per_class": need,
        "seed": cfg.seed,
    }
    if cfg.group_by is not None:
        # per pool, per group value: the conditions that can fill an episode inside that group
        split["group_by"] = cfg.group_by
        split["groups"] = groups
        split["group_normal_patients"] = group_normal
    return split, warnings


def _per_group_patients(table: LabelTable, rows: np.ndarray) -> dict[str, int]:
    """Distinct patients among `rows` per group value (only groups that have any)."""
    if not len(rows):
        return {}
    pairs = np.unique(np.stack([table.group_codes[rows], table.patient_codes[rows]]), axis=1)
    codes, counts = np.unique(pairs[0], return_counts=True)
    return {table.group_names[int(c)]: int(n) for c, n in zip(codes, counts)}


def _usable_groups(info: dict, normal: dict[str, int], need: int, cfg: EpisodesConfig) -> list[str]:
    """Groups in which a condition can fill a class of an episode (and, with binary episodes, in which
    the normal class can too: a binary episode stays inside one group like any other)."""
    return sorted(
        g
        for g, n in info.get("group_eligible_patients", {}).items()
        if n >= need and ("binary" not in cfg.kinds or normal.get(g, 0) >= need)
    )


def _group_shortfall(info: dict, need: int, cfg: EpisodesConfig) -> str:
    per = info.get("group_eligible_patients", {})
    best = max(per.items(), key=lambda kv: (kv[1], kv[0]), default=("-", 0))
    extra = " with enough normal patients" if "binary" in cfg.kinds else ""
    return (
        f"{info['eligible_patients']} eligible patients in the {info['pool']} pool, but episodes stay within "
        f"one {cfg.group_by} (episodes.group_by) and no {cfg.group_by}{extra} holds the {need} an episode "
        f"needs (most: {best[0]} with {best[1]})"
    )


def _check_enough_in_a_group(
    groups: dict[str, dict[str, list[str]]],
    group_normal: dict[str, dict[str, int]],
    cfg: EpisodesConfig,
    used_pools: list[str],
    need: int,
) -> None:
    """Every used pool needs one group that can hold a whole episode of every configured kind."""
    want = cfg.n_way if "n_way" in cfg.kinds else 1
    for pool in used_pools:
        sizes = {g: len(c) for g, c in groups[pool].items()}
        if max(sizes.values(), default=0) >= want:
            continue
        listing = ", ".join(f"{g}: {n}" for g, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])))
        normals = ""
        if "binary" in cfg.kinds:
            normals = (
                f"; normal patients per {cfg.group_by} in the {pool} pool: "
                + (", ".join(f"{g}: {n}" for g, n in sorted(group_normal[pool].items())) or "none")
                + f" (binary episodes need {need} in the same {cfg.group_by})"
            )
        raise DataError(
            f"episodes.group_by: {cfg.group_by}: every episode stays within one {cfg.group_by}, and "
            f"{'n_way episodes need ' + str(cfg.n_way) if 'n_way' in cfg.kinds else 'episodes need 1'} "
            f"conditions with {need} eligible patients each in the same {cfg.group_by}. In the {pool} "
            f"pool no {cfg.group_by} has that many (usable conditions per {cfg.group_by}: "
            f"{listing or 'none'}){normals}. Lower episodes.n_way or k_shot / q_query, move "
            f"conditions between splits, or drop episodes.group_by"
        )


_RULE_OF_POOL = {
    "test": "rule 1 (a patient with any scan of a rare condition -> test)",
    "val": "rule 2 (else, a patient with any scan of a validation condition -> val)",
    "train": "rule 3 (else, a patient with any scan of a common condition -> train)",
}
_SPLIT_WORD = {"train": "common", "val": "validation", "test": "rare"}


def pool_causes(
    table: LabelTable,
    assignment: dict[str, str],
    patient_pool: np.ndarray,
    cfg: EpisodesConfig,
    pools: list[str],
) -> list[str]:
    """Why each of `pools` holds the patients it holds: which pool rule (module docstring) took which
    patients into which pool, and which held-out conditions made it do so. One paragraph per pool."""
    if not pools:
        return []
    n_p = len(table.patient_keys)
    split_code = np.array(
        [POOLS.index(assignment[n]) if assignment.get(n) in POOLS else -1 for n in table.names]
    )
    has = np.zeros((n_p, len(POOLS)), dtype=bool)  # patient has a scan of a condition of split p
    for p in range(len(POOLS)):
        cols = np.flatnonzero(split_code == p)
        if len(cols):
            has[table.patient_codes[table.findings[:, cols].any(axis=1)], p] = True
    rest = ~has.any(axis=1)  # rule 4: normal-only (or only excluded findings)
    lines = ["Why the pools hold these patients (docs/tasks.md, 'Patient pools'):"]
    lost_all = False
    f = cfg.normal_fraction
    for pool in pools:
        p = POOLS.index(pool)
        cand = has[:, p]
        n_cand, kept = int(cand.sum()), int((cand & (patient_pool == p)).sum())
        said = [f"{pool} pool: {int((patient_pool == p).sum())} patients."]
        if not (split_code == p).any():
            said.append(f"No condition is in the {_SPLIT_WORD[pool]} split.")
        else:
            said.append(
                f"Of the {n_cand} patients with a scan of a {_SPLIT_WORD[pool]} condition, {kept} are in it."
            )
            lost_all |= n_cand > 0 and kept == 0
        for q in range(p + 1, len(POOLS)):
            took = cand & (patient_pool == q)
            if not took.any():
                continue
            # which conditions of the later split those patients carry, most patients first
            cols = np.flatnonzero(split_code == q)
            scans = np.isin(table.patient_codes, np.flatnonzero(took))
            per = np.array([_n_patients(table.patient_codes[scans & table.findings[:, c]]) for c in cols])
            top = [
                f"{table.names[int(cols[i])]} ({int(per[i])})" for i in np.argsort(-per, kind="stable")[:3]
            ]
            said.append(
                f"{_RULE_OF_POOL[POOLS[q]][0].upper()}{_RULE_OF_POOL[POOLS[q]][1:]} took {int(took.sum())} of "
                f"them into the {POOLS[q]} pool, because they also have scans of {_SPLIT_WORD[POOLS[q]]} "
                f"conditions (patients per condition: {', '.join(top)}{', ...' if len(cols) > 3 else ''})."
            )
        said.append(
            f"Rule 4 (patients without a scan of a used condition, shared by normal_fraction train "
            f"{f.train:g} / val {f.val:g} / test {f.test:g}) gave it {int((rest & (patient_pool == p)).sum())} "
            f"of {int(rest.sum())}."
        )
        lines.append("  - " + " ".join(said))
    if lost_all:
        rows, cols = np.nonzero(table.findings)
        pairs = np.unique(table.patient_codes[rows] * max(len(table.names), 1) + cols)
        per_patient = np.bincount(pairs // max(len(table.names), 1), minlength=n_p)
        per_patient = per_patient[per_patient > 0]
        lines.append(
            f"  A pool lost every patient of its conditions to a later pool. Patients with a finding here carry "
            f"a median of {float(np.median(per_patient)) if len(per_patient) else 0:g} distinct conditions: if that is not how your patients are, the "
            "data manifest's labels.patient_column may not identify patients (a value shared by unrelated "
            "scans, e.g. a site, a device or a drawer number reused across classes, joins them into one "
            "patient), docs/ingest.md."
        )
    return lines


def _check_enough_conditions(
    conditions: dict[str, dict],
    cfg: EpisodesConfig,
    used_pools: list[str],
    dropped: list[str],
    table: Callable[[str], list[str]],
) -> None:
    for pool in used_pools:
        names = [n for n, i in conditions.items() if i["split"] == pool]
        want = cfg.n_way if "n_way" in cfg.kinds else 1
        if len(names) < want:
            what = {"train": "common (meta-train)", "val": "validation", "test": "rare (meta-test)"}[pool]
            fix = {
                "train": "list conditions under episodes.split.common",
                "val": "list conditions under episodes.split.validation (or set val_episodes: 0)",
                "test": "list conditions under episodes.split.rare or set episodes.split.rare_below_patients",
            }[pool]
            lost = [n for n in dropped if conditions[n].get("pool") == pool]
            extra = f" ({', '.join(lost)} dropped for too few patients)" if lost else ""
            need = f"n_way episodes need {cfg.n_way}" if "n_way" in cfg.kinds else "episodes need 1"
            lower = ", lower episodes.n_way" if "n_way" in cfg.kinds else ""
            raise DataError(
                f"the {what} split has {len(names)} usable condition(s) {names}{extra}, but {need}: "
                f"{fix}{lower}, or lower k_shot / q_query.\n" + "\n".join(table(pool))
            )


def _count_table(
    conditions: dict[str, dict],
    normal: dict[str, dict],
    need: int,
    cfg: EpisodesConfig,
    short: list[str],
    normal_short: list[str],
    used_pools: list[str],
) -> list[str]:
    """Every condition's patient counts against what an episode needs, one line each (scarcest first)."""
    lines = [
        f"  {'condition':<24} {'pool':<8} {'patients':>8} {'in pool':>8} {'eligible':>8} {'needed':>6}  status"
    ]
    for name, info in sorted(conditions.items(), key=lambda kv: (kv[1].get("eligible_patients", -1), kv[0])):
        if "eligible_patients" in info:
            pool = info["pool"]
            status = "TOO FEW" if name in short else ("ok" if pool in used_pools else "unused pool")
            if name in short and info["eligible_patients"] >= need:
                status = f"TOO FEW in any one {cfg.group_by}"  # episodes.group_by
            if name in short and info["split"] == "dropped":
                status += ", dropped"
            lines.append(
                f"  {name:<24} {pool:<8} {info['patients']:>8} {info['pool_patients']:>8} "
                f"{info['eligible_patients']:>8} {need:>6}  {status}"
            )
        else:
            lines.append(
                f"  {name:<24} {'-':<8} {info['patients']:>8} {'-':>8} {'-':>8} {'-':>6}  {info['reason']}"
            )
    if "binary" in cfg.kinds:
        for pool, n in normal.items():
            status = "TOO FEW" if pool in normal_short else ("ok" if pool in used_pools else "unused pool")
            label = f"(normal, {pool} pool)"
            lines.append(
                f"  {label:<24} {pool:<8} {'':>8} {n['patients']:>8} {n['patients']:>8} {need:>6}  {status}"
            )
    return lines


def _shortage_message(
    conditions: dict[str, dict],
    normal: dict[str, dict],
    need: int,
    cfg: EpisodesConfig,
    short: list[str],
    normal_short: list[str],
    used_pools: list[str],
    causes: list[str],
) -> str:
    rule = (
        "scans fitting the multi-label rule; n_way: against the n_way-1 conditions of the split that "
        "co-occur with it least"
        if "n_way" in cfg.kinds
        else "scans fitting the multi-label rule"
    )
    lines = [
        f"not enough patients: an episode needs {need} distinct patients per class "
        f"(k_shot {max(cfg.k_shots)} + q_query {cfg.q_query}; one scan per patient per episode). "
        f"Eligible patients count {rule}.",
        *_count_table(conditions, normal, need, cfg, short, normal_short, used_pools),
    ]
    fixes = "lower k_shot / q_query, move the condition to another split"
    if short:
        fixes += ", or set episodes.on_insufficient: drop to drop it with a warning"
    if normal_short:
        fixes += (
            f"; for normal patients adjust episodes.normal_fraction (short in: {', '.join(normal_short)})"
        )
    return "\n".join([*lines, *causes, f"Fix: {fixes}."])
