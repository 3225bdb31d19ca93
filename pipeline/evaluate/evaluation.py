"""The whole evaluation, as a library function (no mlflow): methods × seeds × episode groups.

For every seed and every (kind, k_shot) group of the fixed test episodes:
1. each method's hyper-parameters are chosen on that group's VALIDATION episodes (`select_on_validation`,
   which refuses any episode holding a scan outside the validation pool);
2. the chosen configuration runs once on the test episodes;
3. on the first seed, adaptation curves (accuracy vs inner steps, vs k-shot) are measured on the first
   `curve_episodes` test episodes with the chosen configuration.
Seeds are what a result depends on besides the patients: for a meta-learned method, its meta-training
seed (meta-train trains one model per `meta_train.seeds`; adaptation itself is deterministic), for the
baselines the evaluation seed (pretraining of the traditional classifier, the scratch initialization).
Every seed's model runs on the same test episodes, and the patient bootstrap resamples seeds too, so a
verdict includes the variance between training runs (summary.py, bootstrap.py).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import SplitFile
from pipeline.errors import DataError
from pipeline.evaluate import baselines, runner, summary
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.runner import Candidate, EpisodeOutcome, Group, Loader, Method, Selection
from pipeline.meta.model_io import MetaModel
from pipeline.meta.models import ModelSpec
from pipeline.names import metric_key
from pipeline.progress import log

FAMILY_META = "meta-learned"
FAMILY_TRAD = "traditional"
FAMILY_SCRATCH = "from scratch"


@dataclass
class Inputs:
    """Everything the evaluation reads, already loaded."""

    meta_models: dict[str, MetaModel]  # folder name under models/ → loaded meta-model
    val: list[Any]  # Episode
    test: list[Any]
    split: SplitFile
    store: Any  # ImageStore: .images, .index, .rows_for
    load: Loader  # episode → (x_s, y_s, x_q, y_q)
    provenance: dict[str, str]  # meta_train_run, episodes_run, ingest_run
    device: torch.device = torch.device("cpu")
    # method → {meta-training seed → meta-model} for the seeds after the first (meta-train's seeds/ folder)
    meta_seed_models: dict[str, dict[int, MetaModel]] = field(default_factory=dict)


@dataclass
class MethodPlan:
    """How to evaluate one method for one seed: its grid of candidates and inner-step counts."""

    name: str
    family: str
    description: str
    candidates: list[Candidate]
    step_grid: list[int | None]
    seed_independent: bool


def meta_seed(mm: MetaModel) -> int:
    """The meta-training seed a meta-model was trained with (0 for models written before seeds existed)."""
    return int(mm.meta.meta_train_seed or 0)


def _meta_plan(name: str, mm: MetaModel, cfg: EvaluateConfig, one_seed: bool = True) -> MethodPlan:
    if mm.meta.method == "protonet":
        return MethodPlan(
            name,
            FAMILY_META,
            "prototypical network meta-trained on the same episodes (nearest class mean of embeddings; "
            "no inner loop, no test-time hyper-parameter)",
            [Candidate({}, lambda: mm.method())],
            [None],
            one_seed,
        )
    inner = mm.meta.inner
    trained = int(inner.eval_steps or inner.steps)
    steps: list[int | None] = list(sorted(cfg.meta.steps)) if cfg.meta.steps else [trained]
    # learned_lr is "none" for the plain MAML family (a non-empty string: test the value, not truth)
    lr = "learned per-layer/step" if inner.learned_lr not in (None, "none") else f"{inner.lr}"
    return MethodPlan(
        name,
        FAMILY_META,
        f"{mm.meta.method} meta-learned initialization ({mm.meta.model.backbone}, head "
        f"{mm.meta.head}, norm {mm.meta.normalization}), adapted on the support set with "
        f"inner lr {lr}, trained with {inner.steps} inner steps; test-time steps from {steps}",
        [Candidate({}, lambda: mm.method())],
        steps,
        one_seed,
    )


def _spec_of(inputs: Inputs) -> tuple[ModelSpec, int, tuple[int, ...]]:
    """The architecture every baseline uses: that of the (first) meta-trained model."""
    if not inputs.meta_models:
        raise DataError("the meta-train run has no trained model under models/; nothing to compare with")
    mm = next(iter(inputs.meta_models.values()))
    shape = mm.image_shape
    return mm.meta.model, int(shape[0]), tuple(int(s) for s in shape[1:])


def _finetune_plan(pre: baselines.Pretrained, cfg: EvaluateConfig) -> MethodPlan:
    cands = []
    for mode in cfg.finetune.modes:
        for lr in cfg.finetune.lrs:

            def build(mode: str = mode, lr: float = lr) -> Method:
                if mode == "head":
                    return baselines.HeadOnlyMethod(
                        "finetune", pre.model, lr, max(cfg.finetune.steps), cfg.finetune.head_init
                    )
                return baselines.whole_network_method("finetune", pre.model, lr, max(cfg.finetune.steps))

            cands.append(Candidate({"mode": mode, "lr": lr}, build))
    return MethodPlan(
        "finetune",
        FAMILY_TRAD,
        "the same architecture trained as an ordinary classifier on every single-label scan of the meta-train "
        f"pool (common conditions + normal), then fine-tuned on each support set with a fresh {cfg.finetune.head_init} "
        "head by "
        f"gradient descent: head only or whole network, lr in {cfg.finetune.lrs}, steps in {cfg.finetune.steps} "
        "(the better chosen on validation)",
        cands,
        list(sorted(cfg.finetune.steps)),
        False,
    )


def _scratch_plan(
    spec: ModelSpec, in_ch: int, size: tuple[int, ...], cfg: EvaluateConfig, seed: int, device: torch.device
) -> MethodPlan:
    model = baselines.scratch_model(spec, in_ch, size, seed, cfg.scratch.head_init).to(device)
    cands = []
    for lr in cfg.scratch.lrs:

        def build(lr: float = lr) -> Method:
            return baselines.whole_network_method("scratch", model, lr, max(cfg.scratch.steps))

        cands.append(Candidate({"lr": lr}, build))
    return MethodPlan(
        "scratch",
        FAMILY_SCRATCH,
        "the same architecture from a random initialization (one draw per seed), trained on the support set "
        f"alone by gradient descent from a {cfg.scratch.head_init} head, lr in {cfg.scratch.lrs}, steps in "
        f"{cfg.scratch.steps}",
        cands,
        list(sorted(cfg.scratch.steps)),
        False,
    )


def _first(episodes: Sequence[Any], n: int | None) -> list[Any]:
    return list(episodes if n is None else episodes[:n])


def run(
    inputs: Inputs, cfg: EvaluateConfig, on_method_done: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Evaluate every method; return the results dict (the content of results.json)."""
    val_keys = inputs.split.pool_keys("val")
    test_keys = inputs.split.pool_keys("test")
    # The test files must hold test-pool scans only (a swapped or foreign file is refused).
    runner.assert_from_pool(inputs.test, test_keys, "test")
    test_groups = {g: _first(eps, cfg.max_episodes) for g, eps in runner.group_episodes(inputs.test).items()}
    val_groups = {g: _first(eps, cfg.val_episodes) for g, eps in runner.group_episodes(inputs.val).items()}
    missing = [g for g in test_groups if g not in val_groups]
    if missing:
        raise DataError(
            f"no validation episodes for {', '.join(f'{k} k={s}' for k, s in missing)}: hyper-parameters are "
            "only chosen on validation episodes; re-run the episodes stage with val_episodes > 0"
        )
    spec, in_ch, size = _spec_of(inputs)
    seeds = list(cfg.seeds)
    max_k: dict[str, int] = {}
    for kind, k in test_groups:
        max_k[kind] = max(k, max_k.get(kind, 0))

    selection: dict[str, dict[str, dict[str, Any]]] = {}
    outcomes: dict[str, dict[str, dict[str, list[EpisodeOutcome]]]] = {}  # method → seed → group → outs
    curves: dict[str, dict[str, Any]] = {}
    methods: dict[str, dict[str, Any]] = {}
    pretrain: dict[str, Any] = {}
    timing: dict[str, float] = {}

    def evaluate_plan(plan: MethodPlan, seed: int, first_seed: bool) -> None:
        t0 = time.monotonic()
        methods.setdefault(
            plan.name,
            {
                "family": plan.family,
                "description": plan.description,
                "seed_independent": plan.seed_independent,
            },
        )
        for g, test_eps in test_groups.items():
            gk = summary.group_key(*g)
            sel, method = _select(plan, val_groups[g], inputs.load, val_keys, g)
            selection.setdefault(plan.name, {}).setdefault(str(seed), {})[gk] = sel.to_dict()
            steps = sel.chosen.get("steps")
            outs = runner.run_episodes(
                method, test_eps, inputs.load, steps=steps, desc=f"{plan.name} {gk} test"
            )
            outcomes.setdefault(plan.name, {}).setdefault(str(seed), {})[gk] = outs
            if first_seed and cfg.curve_episodes > 0:
                # the k-shot curve (k' = 1..k on the same queries) only for the largest k of each kind
                curves.setdefault(plan.name, {})[gk] = _curves(
                    method, test_eps[: cfg.curve_episodes], inputs.load, steps, cfg, shots=g[1] == max_k[g[0]]
                )
        timing[plan.name] = timing.get(plan.name, 0.0) + time.monotonic() - t0
        if on_method_done:
            on_method_done(plan.name)

    # Meta-learned methods: one evaluation per meta-training seed (adaptation is deterministic).
    for name, mm in inputs.meta_models.items():
        extra = inputs.meta_seed_models.get(name, {})
        evaluate_plan(_meta_plan(name, mm, cfg, one_seed=not extra), meta_seed(mm), True)
        for s, other in sorted(extra.items()):
            evaluate_plan(_meta_plan(name, other, cfg, one_seed=False), s, False)

    data = None
    for si, seed in enumerate(seeds):
        if cfg.finetune.enabled:
            if data is None:
                data = baselines.pretrain_data(inputs.split, inputs.store.index, inputs.store.rows_for)
            t0 = time.monotonic()
            pre = baselines.pretrain_classifier(
                spec,
                in_ch,
                size,
                inputs.store.images,
                data,
                cfg.finetune.pretrain,
                seed,
                inputs.device,
                head=cfg.finetune.head_init,
            )
            timing["pretrain"] = timing.get("pretrain", 0.0) + time.monotonic() - t0
            pretrain[str(seed)] = pre.report
            log(f"evaluate: traditional classifier (seed {seed}): {_pretrain_line(pre.report)}")
            evaluate_plan(_finetune_plan(pre, cfg), seed, si == 0)
        if cfg.scratch.enabled:
            evaluate_plan(_scratch_plan(spec, in_ch, size, cfg, seed, inputs.device), seed, si == 0)

    return assemble(
        inputs=inputs,
        cfg=cfg,
        methods=methods,
        selection=selection,
        outcomes=outcomes,
        curves=curves,
        pretrain=pretrain,
        timing=timing,
        n_test={summary.group_key(*g): len(v) for g, v in test_groups.items()},
        n_val={summary.group_key(*g): len(val_groups[g]) for g in test_groups},
        n_way={summary.group_key(*g): len(eps[0].classes) for g, eps in test_groups.items()},
        distinct=_distinct_queries(test_groups, inputs.store.index),
        patient_of=_patient_of(inputs.store.index),
    )


def _patient_of(index: Any) -> dict[str, str] | None:
    """Scan key → salted patient key from the scan index (None when the index has no patient key).
    Kept in memory only: the keys are used to cluster the bootstrap, never written out."""
    if "patient_key" not in index:
        return None
    return dict(zip(index["scan_key"].astype(str), index["patient_key"].astype(str)))


def _distinct_queries(groups: dict[Group, list[Any]], index: Any) -> dict[str, dict[str, int]]:
    """Per group: query slots, distinct query scans and patients. Fixed episodes drawn from a small pool
    reuse scans, so episodes are not independent and the 1.96·s/√n interval is then too narrow."""
    patient = _patient_of(index) or {}
    out = {}
    for g, eps in groups.items():
        keys = [k for e in eps for ks in e.query.values() for k in ks]
        out[summary.group_key(*g)] = {
            "query_slots": len(keys),
            "distinct_query_scans": len(set(keys)),
            "distinct_query_patients": len({patient.get(k, k) for k in keys}),
        }
    return out


def _pretrain_line(rep: dict[str, Any]) -> str:
    ho = rep.get("holdout_balanced_acc")
    auc = rep.get("holdout_macro_auc")
    line = (
        f"{rep['n_train_images']} scans, {len(rep['classes'])} classes, {rep['epochs']} epochs "
        f"({rep['stopped']}; best epoch {rep['best_epoch']}), final loss {rep['final_loss']:.3f}"
    )
    if ho is not None:
        line += (
            f"; held-out patients: balanced accuracy {ho:.3f} (chance {rep['holdout_chance_balanced_acc']:.3f})"
            + (f", macro AUC {auc:.3f} (chance 0.5)" if auc is not None else "")
        )
    if rep.get("near_chance"):
        line += " — WARNING: near chance, the fine-tuning baseline rests on a classifier that learned little"
    return line


def _select(
    plan: MethodPlan, val_eps: list[Any], load: Loader, val_keys: set[str], g: Group
) -> tuple[Selection, Method]:
    if len(plan.candidates) == 1 and len(plan.step_grid) == 1:
        # Nothing to choose: record the single configuration, spend no validation episode on it.
        runner.assert_from_pool(val_eps, val_keys, "val")
        chosen = {**plan.candidates[0].hparams, "steps": plan.step_grid[0]}
        sel = Selection(g, 0, [dict(chosen)], chosen)
        return sel, plan.candidates[0].build()
    return runner.select_on_validation(
        plan.candidates,
        plan.step_grid,
        val_eps,
        load,
        val_keys,
        g,
        desc=f"{plan.name} {g[0]}.k{g[1]} validation",
    )


def _curves(
    method: Method, eps: list[Any], load: Loader, steps: int | None, cfg: EvaluateConfig, shots: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {"n_episodes": len(eps), "steps": None, "shots": None}
    if not eps:
        return out
    if runner.has_inner_loop(method):
        by = runner.accuracy_by_steps(
            method, eps, load, list(range(cfg.curve_steps + 1)), desc=f"{method.name} curve vs steps"
        )
        out["steps"] = {str(s): summary.metrics.mean_ci95(v).to_dict() for s, v in by.items()}
    if shots:
        by_k = runner.shot_curve(method, eps, load, steps=steps, desc=f"{method.name} curve vs k")
        out["shots"] = {str(k): v.to_dict() for k, v in by_k.items()}
        out["shots_steps"] = steps
    return out


def assemble(
    *,
    inputs: Inputs,
    cfg: EvaluateConfig,
    methods: dict[str, dict[str, Any]],
    selection: dict[str, Any],
    outcomes: dict[str, dict[str, dict[str, list[EpisodeOutcome]]]],
    curves: dict[str, Any],
    pretrain: dict[str, Any],
    timing: dict[str, float],
    n_test: dict[str, int],
    n_val: dict[str, int],
    n_way: dict[str, int],
    distinct: dict[str, dict[str, int]],
    patient_of: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`patient_of` (scan key → salted patient key) clusters the patient bootstrap; without it each query
    scan is its own cluster (recorded as unit "scan")."""
    results: dict[str, Any] = {}
    for m, by_seed in outcomes.items():
        res_m: dict[str, Any] = {}
        groups = next(iter(by_seed.values())).keys()
        for gk in groups:
            per_seed = {s: summary.summarize(by_seed[s][gk], cfg.ece_bins) for s in by_seed}
            res_m[gk] = {
                "per_seed": per_seed,
                "across_seeds": summary.across_seeds([v["acc"]["mean"] for v in per_seed.values()]),
                "episodes": [
                    {"id": o.episode_id, "acc": o.acc, "classes": o.classes}
                    for o in by_seed[next(iter(by_seed))][gk]
                ],
            }
        results[m] = res_m
    comparisons = {}
    for gk in n_test:
        per_method = {
            m: summary.episode_acc_over_seeds([outcomes[m][s][gk] for s in outcomes[m]]) for m in outcomes
        }
        per_query = {
            m: summary.query_correct_per_seed([outcomes[m][s][gk] for s in outcomes[m]]) for m in outcomes
        }
        first = next(iter(outcomes.values()))
        scans = summary.slot_scans(first[next(iter(first))][gk])
        slot_patient = (
            None if scans is None else {slot: (patient_of or {}).get(k, k) for slot, k in scans.items()}
        )
        comparisons[gk] = summary.compare(
            per_method,
            per_query,
            slot_patient,
            resamples=cfg.bootstrap.resamples,
            # one stream per group, the same for every method of the group (paired differences)
            seed=[cfg.bootstrap.seed, zlib.crc32(gk.encode())],
            unit="patient" if patient_of is not None else "scan",
        )
        if slot_patient is not None:
            comparisons[gk]["per_condition_patient"] = summary.per_condition_patient(
                per_query,
                slot_patient,
                summary.condition_slots(first[next(iter(first))][gk]),
                resamples=cfg.bootstrap.resamples,
                seed=[cfg.bootstrap.seed, zlib.crc32(gk.encode())],
            )
    split = inputs.split
    return {
        "setup": {
            **inputs.provenance,
            "seeds": list(cfg.seeds),
            "meta_train_seeds": {
                m: [meta_seed(mm), *sorted(inputs.meta_seed_models.get(m, {}))]
                for m, mm in inputs.meta_models.items()
            },
            "normal_label": split.normal_label,
            "test_conditions": split.conditions_in("test"),
            "val_conditions": split.conditions_in("val"),
            "train_conditions": split.conditions_in("train"),
            "n_test_episodes": n_test,
            "n_way": n_way,
            "queries": distinct,
            "n_val_episodes": n_val,
            "config": cfg.model_dump(mode="json"),
        },
        "methods": methods,
        "selection": selection,
        "results": results,
        "comparisons": comparisons,
        "curves": curves,
        "pretrain": pretrain,
        "warnings": training_warnings(inputs, pretrain),
        "definitions": summary.DEFINITIONS,
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
    }


def training_warnings(inputs: Inputs, pretrain: dict[str, Any]) -> list[str]:
    """Every method whose training ended near chance: a verdict resting on it compares with nothing learned.

    Meta-learned models: best validation accuracy within 2 points of guessing (mean 1/n_way over the
    validation episodes; meta_model.json `best_val_acc`). Traditional classifier: held-out macro AUC below
    baselines.NEAR_CHANCE_AUC (docs/evaluation.md, "The positive control")."""
    out = []
    chance = float(np.mean([1.0 / len(e.classes) for e in inputs.val])) if inputs.val else None
    models = [(n, mm) for n, mm in inputs.meta_models.items()] + [
        (n, mm) for n, by in inputs.meta_seed_models.items() for mm in by.values()
    ]
    for name, mm in models:
        acc = mm.meta.best_val_acc
        if chance is not None and acc is not None and acc < chance + 0.02:
            out.append(
                f"{name} (meta-training seed {meta_seed(mm)}) ended at validation accuracy {acc:.3f}, chance "
                f"{chance:.3f}: it learned nothing measurable"
            )
    for seed, rep in pretrain.items():
        if rep.get("near_chance"):
            out.append(
                f"the traditional classifier (seed {seed}) reached held-out macro AUC "
                f"{rep['holdout_macro_auc']:.3f} (chance 0.5): fine-tuning rests on features that learned little"
            )
    return out


def key_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The numbers logged as MLflow metrics: test.<method>.<kind>.k<k>.<name>."""
    out: dict[str, float] = {}
    first = str(results["setup"]["seeds"][0])
    for gk, comp in results["comparisons"].items():
        for m, acc in comp["acc"].items():
            base = metric_key("test", m, *gk.split("."))  # pipeline/names.py: MLflow-safe parts
            out[f"{base}.acc"] = acc["mean"]
            if acc["ci95"] is not None:
                out[f"{base}.acc_ci95"] = acc["ci95"]
            pat = (comp.get("acc_patient") or {}).get(m)
            if pat:
                out[f"{base}.acc_patient_low"] = pat["low"]
                out[f"{base}.acc_patient_high"] = pat["high"]
            r = results["results"][m][gk]
            s0 = r["per_seed"].get(first) or next(iter(r["per_seed"].values()))
            for name in ("auc", "sens", "spec"):
                if s0.get(name):
                    out[f"{base}.{name}"] = s0[name]["mean"]
            if s0.get("ece") is not None:
                out[f"{base}.ece"] = s0["ece"]
            if r["across_seeds"]["std"] is not None:
                out[f"{base}.acc_seed_std"] = r["across_seeds"]["std"]
        out[f"test.{gk}.n_episodes"] = float(comp["n_episodes"])
    return {k: float(v) for k, v in out.items() if np.isfinite(v)}
