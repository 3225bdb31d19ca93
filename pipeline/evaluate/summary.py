"""From per-episode outcomes to the numbers of the report: per group, per condition, across seeds,
and paired comparisons between methods on the same episodes.

How each number is aggregated (also written into results.json under `definitions`):
- accuracy, AUC, sensitivity, specificity: computed per episode, then mean ± 95% CI over episodes;
- ECE, reliability bins and confusion matrices: pooled over all query predictions of the group (a
  calibration estimate needs many predictions; one episode has a few dozen);
- per condition: binary episodes → the accuracy of the episodes of that condition; n-way episodes →
  the recall of that condition's queries in every episode that contains it;
- across seeds: the mean and sample std (ddof=1) of the per-seed mean accuracies;
- paired difference: per-episode accuracy of A minus B on the same episodes, mean ± 95% CI;
- patient-level intervals (`bootstrap.PatientBootstrap`): the query slots' correctness resampled by
  patient AND by seed (each resample also redraws the method's seeds), percentile 95% interval of the
  accuracy and of the paired difference; so a verdict includes how much a result moves between training
  runs (meta-training seeds, pretraining seeds), not only between patients.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.evaluate import metrics
from pipeline.evaluate.bootstrap import LEVEL, PatientBootstrap
from pipeline.evaluate.runner import EpisodeOutcome

Slot = tuple[int, int]  # one query row of one episode: (episode id, row in the episode's query)

DEFINITIONS = {
    "ci95": "1.96 * sample std (ddof=1) / sqrt(n) over episodes",
    "acc/auc/sens/spec": "per episode, then mean over episodes",
    "auc": "macro one-vs-rest ROC AUC over the episode's classes",
    "sens/spec": "binary episodes, classes [condition, normal]: recall of condition / recall of normal",
    "ece": "pooled over all query predictions of the group, equal-width bins of top-class confidence",
    "per_condition": "binary: accuracy of that condition's episodes; n_way: recall of that condition per episode",
    "across_seeds": "mean and sample std of per-seed mean accuracies",
    "paired_diff": "mean over the same episodes of acc(A) - acc(B), with its 95% CI",
    "acc_patient": "accuracy over all query slots and seeds, with a seed + patient (two-level cluster) "
    "bootstrap 95% percentile interval: each resample draws the distinct query patients with replacement "
    "(each drawn patient contributing all its query slots) and the method's seeds with replacement",
    "paired_diff_patient": "acc(winner) - acc(other) over all query slots and seeds, with the seed + patient "
    "bootstrap 95% percentile interval (the same patient resamples for both methods: paired; seeds drawn "
    "independently per method); excludes_zero = the difference is supported across patients and seeds",
    "pairs_patient": "every pair of methods (higher-ranked minus lower-ranked): the paired difference with "
    "the same seed + patient bootstrap as paired_diff_patient",
    "per_condition_patient": "per condition, the same patient bootstrap on that condition's query slots "
    "only (binary: every slot of the condition's episodes; n_way: the slots whose true class is the "
    "condition, i.e. its pooled recall), correctness averaged over seeds",
}


def group_key(kind: str, k_shot: int) -> str:
    return f"{kind}.k{k_shot}"


def _ci_or_none(values: Sequence[float | None]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None]
    return metrics.mean_ci95(vals).to_dict() if vals else None


def summarize(outcomes: Sequence[EpisodeOutcome], n_bins: int = 10) -> dict[str, Any]:
    """All numbers of one method on one (kind, k_shot) group of episodes."""
    if not outcomes:
        raise ValueError("summarize needs at least one episode outcome")
    kind = outcomes[0].kind
    probs = np.concatenate([o.probs for o in outcomes])
    y = np.concatenate([o.y for o in outcomes])
    rel = metrics.reliability(probs, y, n_bins) if len({o.probs.shape[1] for o in outcomes}) == 1 else None
    out: dict[str, Any] = {
        "n_episodes": len(outcomes),
        "n_queries": int(y.size),
        "acc": metrics.mean_ci95([o.acc for o in outcomes]).to_dict(),
        "auc": _ci_or_none([o.auc for o in outcomes]),
        "ece": rel.ece if rel is not None else None,
        "reliability": None
        if rel is None
        else {
            "edges": rel.edges.tolist(),
            "count": rel.count.tolist(),
            "confidence": [None if np.isnan(v) else float(v) for v in rel.confidence],
            "accuracy": [None if np.isnan(v) else float(v) for v in rel.accuracy],
        },
    }
    if kind == "binary":
        out["sens"] = _ci_or_none([o.sens for o in outcomes])
        out["spec"] = _ci_or_none([o.spec for o in outcomes])
    out["per_condition"] = per_condition(outcomes)
    out["confusion"] = confusion_by_name(outcomes)
    return out


def per_condition(outcomes: Sequence[EpisodeOutcome]) -> dict[str, dict[str, Any]]:
    vals: dict[str, list[float]] = {}
    for o in outcomes:
        if o.kind == "binary":
            vals.setdefault(o.classes[0], []).append(o.acc)
        else:
            for name, r in o.class_recall().items():
                vals.setdefault(name, []).append(r)
    return {name: metrics.mean_ci95(v).to_dict() for name, v in sorted(vals.items())}


def confusion_by_name(outcomes: Sequence[EpisodeOutcome]) -> dict[str, Any]:
    """Pooled confusion matrix. Binary: positions [condition, normal]. n-way: by condition name."""
    if all(o.kind == "binary" for o in outcomes):
        m = sum(metrics.confusion_matrix(o.probs, o.y) for o in outcomes)
        normal = outcomes[0].classes[1]
        return {"labels": ["condition", normal], "matrix": np.asarray(m).tolist()}
    names = sorted({c for o in outcomes for c in o.classes})
    pos = {n: i for i, n in enumerate(names)}
    m = np.zeros((len(names), len(names)), dtype=np.int64)
    for o in outcomes:
        pred = o.probs.argmax(axis=1)
        for t, p in zip(o.y, pred):
            m[pos[o.classes[t]], pos[o.classes[p]]] += 1
    return {"labels": names, "matrix": m.tolist()}


def across_seeds(per_seed_acc: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(per_seed_acc, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else None,
        "min": float(v.min()),
        "max": float(v.max()),
        "n_seeds": int(v.size),
    }


def paired_difference(a: Sequence[EpisodeOutcome], b: Sequence[EpisodeOutcome]) -> dict[str, Any]:
    """acc(a) - acc(b) on the same episodes (matched by id), mean ± 95% CI."""
    bid = {o.episode_id: o.acc for o in b}
    diffs = [o.acc - bid[o.episode_id] for o in a if o.episode_id in bid]
    if len(diffs) != len(a) or len(a) != len(b):
        raise ValueError("paired comparison needs both methods on the same episodes")
    return metrics.mean_ci95(diffs).to_dict()


def episode_acc_over_seeds(per_seed: Sequence[Sequence[EpisodeOutcome]]) -> dict[int, float]:
    """Per episode id, its accuracy averaged over seeds (the unit for comparisons across methods)."""
    acc: dict[int, list[float]] = {}
    for outs in per_seed:
        for o in outs:
            acc.setdefault(o.episode_id, []).append(o.acc)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def query_correct_over_seeds(per_seed: Sequence[Sequence[EpisodeOutcome]]) -> dict[Slot, float]:
    """Per query slot (episode id, row), whether it was predicted right, averaged over seeds."""
    by_episode: dict[int, list[np.ndarray]] = {}
    for outs in per_seed:
        for o in outs:
            by_episode.setdefault(o.episode_id, []).append(o.correct())
    out: dict[Slot, float] = {}
    for eid, rows in by_episode.items():
        if len({r.size for r in rows}) != 1:
            raise ValueError(f"episode {eid} has different query counts across seeds")
        out.update(((eid, i), v) for i, v in enumerate(np.mean(rows, axis=0).tolist()))
    return out


def query_correct_per_seed(per_seed: Sequence[Sequence[EpisodeOutcome]]) -> list[dict[Slot, float]]:
    """Per seed, whether each query slot (episode id, row) was predicted right (the seed + patient
    bootstrap's input)."""
    return [query_correct_over_seeds([outs]) for outs in per_seed]


PerQuery = dict[Slot, float] | list[dict[Slot, float]]  # one correctness map, or one per seed


def _seed_matrix(corr: PerQuery, slots: Sequence[Slot]) -> np.ndarray:
    """(S, Q) correctness of the slots in order, one row per seed (one row for an averaged map)."""
    maps = corr if isinstance(corr, list) else [corr]
    return np.stack([np.fromiter((m[s] for s in slots), np.float64, len(slots)) for m in maps])


def _method_key(seed: Sequence[int], method: str) -> list[int]:
    """The seed stream of one method's seed draws (independent between methods, fixed per method)."""
    return [*seed, zlib.crc32(method.encode())]


def slot_scans(outcomes: Sequence[EpisodeOutcome]) -> dict[Slot, str] | None:
    """Per query slot, its scan key; None when some outcome does not know its query scans."""
    out: dict[Slot, str] = {}
    for o in outcomes:
        if o.query_keys is None:
            return None
        out.update(((o.episode_id, row), k) for row, k in enumerate(o.query_keys))
    return out


def compare(
    per_method: dict[str, dict[int, float]],
    per_query: Mapping[str, PerQuery] | None = None,
    slot_patient: dict[Slot, str] | None = None,
    resamples: int = 2000,
    seed: int | Sequence[int] = 0,
    unit: str = "patient",
) -> dict[str, Any]:
    """Rank methods on one group and compare the best with every other one.

    `per_method`: method → {episode id → accuracy (mean over seeds)}, all on the same episodes.
    With `per_query` (method → {slot → correctness}, or a list of such maps, one per seed, for the seed +
    patient bootstrap) and `slot_patient` (slot → salted
    patient key), also the patient-level bootstrap: `acc_patient`, `vs_winner[m]["paired_diff_patient"]`
    and `patient_bootstrap` (what was resampled, how often, with which seed). `unit` names what the
    keys of `slot_patient` are ("scan" when the scan index had no patient key: each scan its own cluster).
    """
    ids = None
    for accs in per_method.values():
        ids = set(accs) if ids is None else ids
        if set(accs) != ids:
            raise ValueError("methods were not run on the same episodes; cannot compare them")
    order = sorted(ids or [])
    stats = {m: metrics.mean_ci95([accs[i] for i in order]) for m, accs in per_method.items()}
    ranking = sorted(stats, key=lambda m: (-stats[m].mean, m))
    best = ranking[0]
    vs = {}
    for m in ranking[1:]:
        diff = metrics.mean_ci95([per_method[best][i] - per_method[m][i] for i in order])
        vs[m] = {
            "overlap": stats[best].overlaps(stats[m]),
            "paired_diff": diff.to_dict(),
            "paired_significant": diff.ci95 is not None and diff.mean - diff.ci95 > 0,
        }
    out: dict[str, Any] = {
        "n_episodes": len(order),
        "acc": {m: s.to_dict() for m, s in stats.items()},
        "ranking": ranking,
        "winner": best,
        "vs_winner": vs,
    }
    if per_query is not None and slot_patient is not None:
        if set(per_query) != set(per_method):
            raise ValueError(f"per_query has methods {sorted(per_query)}, per_method {sorted(per_method)}")
        out.update(_patient_level(per_query, slot_patient, best, ranking[1:], vs, resamples, seed, unit))
    return out


def condition_slots(outcomes: Sequence[EpisodeOutcome]) -> dict[str, list[Slot]]:
    """Per condition, the query slots its per-condition number is computed on (as `per_condition`):
    binary → every slot of that condition's episodes; n-way → the slots whose true class it is."""
    out: dict[str, list[Slot]] = {}
    for o in outcomes:
        if o.kind == "binary":
            out.setdefault(o.classes[0], []).extend((o.episode_id, r) for r in range(o.y.size))
        else:
            for r, t in enumerate(o.y.tolist()):
                out.setdefault(o.classes[t], []).append((o.episode_id, r))
    return out


def per_condition_patient(
    per_query: Mapping[str, PerQuery],
    slot_patient: dict[Slot, str],
    cond_slots: dict[str, list[Slot]],
    resamples: int,
    seed: Sequence[int],
) -> dict[str, Any]:
    """Patient-level intervals of each method's per-condition number (definition `per_condition_patient`):
    one bootstrap per condition over the distinct patients of its slots, shared by the methods.
    Returns {"acc": {method: {condition: {mean, low, high}}}, "n_patients": {condition: P}}."""
    acc: dict[str, dict[str, Any]] = {m: {} for m in per_query}
    n_patients: dict[str, int] = {}
    for cond, slots in sorted(cond_slots.items()):
        slots = sorted(slots)
        boot = PatientBootstrap(
            [slot_patient[s] for s in slots], resamples, [*seed, zlib.crc32(cond.encode())]
        )
        n_patients[cond] = boot.n_patients
        for m, corr in per_query.items():
            mat = _seed_matrix(corr, slots)
            acc[m][cond] = boot.accuracy_over_seeds(mat, _method_key(seed, m)).to_dict()
    return {"acc": acc, "n_patients": n_patients}


def _patient_level(
    per_query: Mapping[str, PerQuery],
    slot_patient: dict[Slot, str],
    best: str,
    others: list[str],
    vs: dict[str, dict[str, Any]],
    resamples: int,
    seed: int | Sequence[int],
    unit: str,
) -> dict[str, Any]:
    slots = sorted(slot_patient)
    for m, corr in per_query.items():
        for one in corr if isinstance(corr, list) else [corr]:
            if one.keys() != slot_patient.keys():
                raise ValueError(
                    f"{m} was not scored on the same query slots as the patient map; cannot bootstrap"
                )
    boot = PatientBootstrap([slot_patient[s] for s in slots], resamples, seed)
    seq = [int(x) for x in np.atleast_1d(seed)]
    mat = {m: _seed_matrix(corr, slots) for m, corr in per_query.items()}
    for m in others:
        d = boot.difference_over_seeds(mat[best], mat[m], _method_key(seq, best), _method_key(seq, m))
        vs[m]["paired_diff_patient"] = {**d.to_dict(), "excludes_zero": d.excludes_zero}
    # Every pair (higher-ranked − lower-ranked), not only the winner's: the report needs "each method vs
    # scratch" and "MAML vs fine-tuning" whichever method happens to win.
    ranked = [best, *others]
    pairs = {}
    for ia, a in enumerate(ranked):
        for b in ranked[ia + 1 :]:
            d = boot.difference_over_seeds(mat[a], mat[b], _method_key(seq, a), _method_key(seq, b))
            pairs[f"{a} - {b}"] = {"a": a, "b": b, **d.to_dict(), "excludes_zero": d.excludes_zero}
    return {
        "pairs_patient": pairs,
        "acc_patient": {
            m: boot.accuracy_over_seeds(v, _method_key(seq, m)).to_dict() for m, v in mat.items()
        },
        "n_seeds": {m: int(v.shape[0]) for m, v in mat.items()},
        "patient_bootstrap": {
            "unit": unit,
            "interval": "percentile",
            "level": LEVEL,
            "n_resamples": boot.n_resamples,
            "seed": [int(s) for s in np.atleast_1d(seed)],
            "n_patients": boot.n_patients,
            "n_query_slots": boot.n_slots,
        },
    }
