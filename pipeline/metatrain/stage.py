"""`fewscan meta-train`: an episodes run → meta-learned initializations (an MLflow run tagged
fewscan.stage=meta-train). Thin: reads the split, the fixed validation episodes and the image store,
then trains each configured method with `pipeline.meta.trainer.MetaTrainer` and logs what it produces.

Every method is trained once per seed of `meta_train.seeds`. Artifacts: `models/<method>/{state_dict.pth,
meta_model.json}` for the first seed (uploaded as soon as it finishes; the model adapt uses),
`seeds/<method>/<seed>/` the same for every further seed (evaluate states its verdicts across all seeds),
`checkpoints/<method>/{last.pt, best.pt}` and `checkpoints/<method>/seed-<seed>/` (uploaded when written;
`--resume` continues from `last.pt`), `curves.json` (every logged row of every method and seed, keyed
`<method>` and `<method>.seed<seed>`). The first method's first-seed model is registered as
`fewscan-<suite>-meta` (alias `latest` → the tracking module's default alias).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import atomic, distributed
from pipeline.artifacts import SplitFile, read_artifact
from pipeline.cpus import torch_threads
from pipeline.episodes.batch import episode_arrays, stack_episodes
from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.episode import Episode, load_episodes
from pipeline.episodes.sampler import TrainSampler
from pipeline.errors import ConfigError
from pipeline.ingest.store import ImageStore
from pipeline.meta import native
from pipeline.meta.algorithms import MetaLearner, make_algorithm
from pipeline.meta.device import pick_device
from pipeline.meta.inner import detach_lr
from pipeline.meta.model_file import IngestFacts
from pipeline.meta.model_io import save_meta_model, write_json_atomic
from pipeline.meta.models import build_model, count_parameters
from pipeline.meta.trainer import Episode as EpisodeTensors
from pipeline.meta.trainer import MetaBatch, MetaTrainer, OuterConfig, load_checkpoint
from pipeline.metatrain.config import MetaTrainConfig

# the command-line hooks live in options.py (no torch: the CLI validates before importing it)
from pipeline.metatrain.options import add_arguments as add_arguments
from pipeline.metatrain.options import compose_section as compose_section
from pipeline.metatrain.options import overrides_from_args as overrides_from_args
from pipeline.names import metric_key
from pipeline.progress import log
from pipeline.protocols import RunLike
from pipeline.tracking import StageResult, UpstreamRun

CONFIG = MetaTrainConfig


def run_name(cfg: MetaTrainConfig) -> str:
    """e.g. "meta-train maml+protonet conv4 3 inner steps 1st order x300"."""
    order = "2nd" if cfg.inner.second_order else "1st"
    return (
        f"meta-train {'+'.join(cfg.methods)} {cfg.model.backbone} {cfg.inner.steps} inner steps {order} order "
        f"x{cfg.outer.steps}"
    )


# ------------------------------------------------------------------------------------------ helpers
def train_episodes_config(
    split: SplitFile, cfg: MetaTrainConfig, method: str | None = None
) -> EpisodesConfig:
    """The episode shapes of the episodes run (recorded in split.json), with meta_train.train_episodes
    overrides, then its per_method overrides for `method`. Episodes within a group (split.json
    `group_by`) stay within a group in meta-training too (docs/tasks.md)."""
    te = cfg.train_episodes
    pm = te.per_method.get(method or "")

    def pick(key: str) -> Any:
        return next((v for v in (getattr(pm, key, None), getattr(te, key)) if v is not None), None)

    return EpisodesConfig(
        kinds=pick("kinds") or list(split.kinds),
        k_shot=pick("k_shot") or list(split.k_shots),
        q_query=pick("q_query") or split.q_query,
        n_way=pick("n_way") or split.n_way,
        multilabel=split.multilabel,
        group_by=split.group_by,
    )


def train_samplers(split: SplitFile, index: Any, cfg: MetaTrainConfig) -> dict[str, TrainSampler]:
    """One meta-training sampler per method (methods with the same episode settings share one), with
    meta_train.train_episodes.rotations (docs/tasks.md, "Rotated classes")."""
    out: dict[str, TrainSampler] = {}
    shared: dict[str, TrainSampler] = {}
    table = None
    for m in cfg.methods:
        ep_cfg = train_episodes_config(split, cfg, m)
        pm = cfg.train_episodes.per_method.get(m)
        rot = (pm.rotations if pm is not None else None) or cfg.train_episodes.rotations or [0]
        key = f"{ep_cfg.model_dump_json()}|{sorted(rot)}"
        if key not in shared:
            shared[key] = TrainSampler(split, index, ep_cfg, table=table, rotations=rot)
            table = shared[key].table  # one parse of the scan index for every method
        out[m] = shared[key]
    return out


def pick_val_episodes(episodes: list[Episode], limit: int | None) -> list[Episode]:
    """At most `limit` episodes, evenly spread over the file (so every kind and k_shot stays represented)."""
    if limit is None or len(episodes) <= limit:
        return episodes
    idx = np.linspace(0, len(episodes) - 1, limit).round().astype(int)
    return [episodes[i] for i in sorted(set(idx.tolist()))]


def ingest_facts_of(store: ImageStore, ingest_run_id: str) -> tuple[IngestFacts, list[str]]:
    """The ingest facts a meta-model records (modalities of the scan index, preprocessing, normal label,
    salt id) and the ingest's salted patient keys (for adapt's query-patient check)."""
    idx = store.index
    mods = sorted(
        {str(m).strip().upper() for m in idx["modality"].dropna() if str(m).strip()}
        if "modality" in idx
        else set()
    )
    patients = sorted(set(idx["patient_key"].dropna().astype(str)) - {""}) if "patient_key" in idx else []
    facts = IngestFacts(
        run_id=ingest_run_id,
        preprocessing=dict(store.meta.get("preprocessing") or {}),
        modalities=mods,
        normal_label=store.meta.get("normal_label"),
        label_names=list(store.meta.get("label_names") or []),
        salt_id=store.meta.get("salt_id"),
        n_patients=len(patients),
    )
    return facts, patients


def method_seed(seed: int, index: int) -> int:
    """Independent, reproducible seed per method (same seed, same method position → same run)."""
    return int(np.random.default_rng([seed, index]).integers(2**31 - 1))


def resume_checkpoint(run: RunLike, method: str, ckdir: Path) -> dict[str, Any] | None:
    """The resumed run's last checkpoint of `method` (None if it has none), and its best.pt copied into
    `ckdir`. Both are read with the safe unpickler (`load_checkpoint`): the run may be someone else's,
    named by id with `--resume RUN_ID` (docs/scaling.md, section 2)."""
    last = run.own_artifact(f"checkpoints/{method}/last.pt")
    if last is None or not last.is_file():
        return None
    ck = load_checkpoint(last)
    best = run.own_artifact(f"checkpoints/{method}/best.pt")
    if best is not None and best.is_file():
        load_checkpoint(best)  # refused here, before training, rather than after it
        ckdir.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(ckdir / "best.pt", best.read_bytes())
    return ck


def _sampler_fn(sampler: TrainSampler, store: ImageStore, meta_batch: int, ctx: distributed.DistContext):
    def sample(rng: np.random.Generator) -> MetaBatch:
        eps = sampler.sample_batch(rng, meta_batch)  # the WHOLE meta-batch, same draws on every rank
        eps = distributed.shard(eps, ctx)  # this rank's tasks (all of them in one process)
        x_s, y_s, x_q, y_q = stack_episodes(eps, store)
        return x_s, y_s, x_q, y_q, eps[0].n_way

    return sample


# ------------------------------------------------------------------------------------------ execute
def execute(cfg: MetaTrainConfig, run: RunLike, upstream: dict[str, UpstreamRun]) -> StageResult:
    ep_up = upstream["episodes"]
    ingest_up = ep_up.upstream("ingest")
    store = ImageStore.open(ingest_up.artifact("store"))
    # through split.json's model: a split of another fewscan version fails here, naming the field
    split = read_artifact(SplitFile, ep_up.artifact(SplitFile.FILE))
    val_all = load_episodes(ep_up.artifact("episodes/val.jsonl"))
    # Intra-op threads sized from the CPUs this process may use (the task-thread pool takes its size from
    # them and runs each task with one), restored when the stage ends (docs/scaling.md, "CPU threads and
    # worker pools").
    # The scratch folder (checkpoints, model folders before upload) goes when the stage ends, failed or not.
    with torch_threads(cfg.threads), tempfile.TemporaryDirectory(prefix="fewscan-metatrain-") as scratch:
        return _execute(cfg, run, ep_up, ingest_up, store, split, val_all, Path(scratch))


def _execute(
    cfg: MetaTrainConfig,
    run: RunLike,
    ep_up: UpstreamRun,
    ingest_up: UpstreamRun,
    store: ImageStore,
    split: SplitFile,
    val_all: list[Episode],
    scratch: Path,
) -> StageResult:
    ctx = distributed.current()
    if cfg.meta_batch < ctx.world_size:
        raise ConfigError(
            f"meta_train.meta_batch={cfg.meta_batch} is smaller than the {ctx.world_size} processes; every "
            "process needs at least one task: raise meta_batch or start fewer processes"
        )
    device = ctx.device if ctx.is_distributed else pick_device(cfg.device)

    image_shape = tuple(int(s) for s in store.images.shape[1:])  # (C, H, W) or (C, D, H, W)
    ep_cfg = train_episodes_config(split, cfg)
    samplers = train_samplers(split, store.index, cfg)  # per method (train_episodes.per_method)
    sampler = samplers[cfg.methods[0]]
    val_eps = pick_val_episodes(val_all, cfg.val_episodes)
    if not val_eps:
        log("meta-train: WARNING: the episodes run has no validation episodes; keeping the last weights")
    val_tensors: list[EpisodeTensors] = []
    for ep in val_eps:
        x_s, y_s, x_q, y_q = episode_arrays(ep, store, device)
        val_tensors.append((x_s, y_s, x_q, y_q, ep.n_way))
    suite = ep_up.tags.get("fewscan.suite") or "standalone"
    reg_name = cfg.register_as or f"fewscan-{suite}-meta"

    run.log_params(
        {
            "derived": {
                "image_shape": list(image_shape),
                "device": str(device),
                "normalization": cfg.model.norm,
                "head": cfg.model.head,
                "train_conditions": sampler.conditions,
                "train_kinds": ep_cfg.kinds,
                "train_k_shots": ep_cfg.k_shots,
                "train_q_query": ep_cfg.q_query,
                "train_n_way": {m: s.cfg.n_way for m, s in samplers.items()},
                "train_rotations": {m: list(s.rotations) for m, s in samplers.items()},
                "group_by": ep_cfg.group_by,
                "val_episodes_used": len(val_eps),
                "ingest_run_id": ingest_up.run_id,
                "torch_threads": torch.get_num_threads(),
                "world_size": ctx.world_size,
                # speed only (results agree to rounding either way): compiled CPU kernels loaded or not
                # (the reason, which may name local paths, goes to the log only)
                "cpu_kernels": native.status().split(":")[0] if device.type == "cpu" else "n/a (not CPU)",
            }
        }
    )
    log(
        f"meta-train: {len(sampler.conditions)} common conditions, images {image_shape}, device {device}, "
        f"{len(val_eps)} val episodes, methods {cfg.methods}"
        + (f", CPU kernels {native.status()}" if device.type == "cpu" else "")
    )

    # What adapt needs of the ingest, recorded in every meta_model.json so that adapt reads it from the
    # meta-model alone instead of walking back to the episodes and ingest runs (docs/adapt.md)
    ingest_facts, patient_keys = ingest_facts_of(store, ingest_up.run_id)

    # What guessing scores on these validation episodes (mean over episodes of 1/n_way): a kept model no
    # better than this learned nothing measurable, and the summary says so.
    val_chance = float(np.mean([1.0 / t[4] for t in val_tensors]))
    at_chance: list[str] = []
    curves: dict[str, list[dict[str, float]]] = {}
    results: dict[str, dict[str, float]] = {}
    seed_vals: dict[str, list[float]] = {}

    def _train_one(method: str, i: int, base_seed: int, unit: str, model_dest: str) -> float:
        """Meta-train `method` (position i) with one seed; returns its best validation accuracy."""
        seed = method_seed(base_seed, i)
        torch.manual_seed(seed)  # the initialization is part of the seeded run
        model = build_model(cfg.model, image_shape[0], image_shape[1:])
        learner = MetaLearner(model, make_algorithm(method, cfg.inner, cfg.mamlpp), cfg.inner)
        outer = OuterConfig(
            steps=cfg.outer.steps,
            lr=cfg.outer.lr,
            schedule=cfg.outer.schedule,
            warmup_steps=cfg.outer.warmup_steps,
            min_lr_ratio=cfg.outer.min_lr_ratio,
            clip_grad=cfg.outer.clip_grad,
            val_every=cfg.val_every,
            checkpoint_every=cfg.checkpoint_every,
        )
        trainer = MetaTrainer(
            learner, outer, seed=seed, device=device, amp_bf16=cfg.amp, dist=ctx, meta_batch=cfg.meta_batch
        )
        ckdir = scratch / "checkpoints" / unit
        # rank 0 only: the other ranks' FollowerRun never resumes; they get rank 0's checkpoint
        ck = resume_checkpoint(run, unit.replace(".seed", "/seed-"), ckdir) if run.resumed else None
        ck = distributed.broadcast_object(ck, ctx)
        if ck is not None:
            trainer.load_state_dict(ck)
            log(f"meta-train: {unit}: resumed from step {trainer.state.step}/{outer.steps}")

        def on_metrics(row: dict[str, float], step: int) -> None:
            run.log_metrics({metric_key(*unit.split("."), k): v for k, v in row.items()}, step=step)

        def on_checkpoint(path: Path) -> None:
            run.log_artifact(path, f"checkpoints/{unit.replace('.seed', '/seed-')}")

        state = trainer.fit(
            _sampler_fn(samplers[method], store, cfg.meta_batch, ctx),
            val_episodes=val_tensors,
            ckpt_dir=ckdir,
            on_metrics=on_metrics,
            on_checkpoint=on_checkpoint,
            desc=f"meta-train {unit}",
        )
        used = "last"
        if cfg.select == "best" and (ckdir / "best.pt").is_file():
            best_ck = load_checkpoint(ckdir / "best.pt")
            learner.load_state_dict(best_ck["learner"])
            used = f"best (step {state.best_step})"
        curves[unit] = state.history
        folder = scratch / model_dest
        inner = {
            "steps": cfg.inner.steps,
            "eval_steps": cfg.inner.eval_steps if cfg.inner.eval_steps is not None else cfg.inner.steps,
            "lr": cfg.inner.lr,
            "learned_lr": learner.algo.learned_lr,
            "trainable": learner.algo.trainable,
            "second_order": learner.algo.second_order,
            "clip_grad": cfg.inner.clip_grad,
        }
        save_meta_model(
            folder,
            model.cpu(),
            method=method,
            model_spec=cfg.model,
            image_shape=image_shape,
            inner=inner,
            inner_lr=detach_lr(learner.inner_lr()),
            ingest=ingest_facts,
            # the patient list only in the model adapt uses (models/<method>); the further seeds' models
            # serve evaluate alone, and at ChestX-ray14 size each copy would be ~0.5 MB of keys
            patient_keys=patient_keys if unit == method else None,
            extra={
                "ingest_run_id": ingest_up.run_id,
                "episodes_run_id": ep_up.run_id,
                "meta_train_run_id": run.run_id,
                "preprocessing": store.meta.get("preprocessing", {}),
                "label_names": store.meta.get("label_names", []),
                "normal_label": split.normal_label,
                "train_conditions": sampler.conditions,
                "selected": used,
                "best_val_acc": state.best_val if state.best_step >= 0 else None,
                "outer_steps": state.step,
                "seed": seed,
                "meta_train_seed": base_seed,
            },
        )
        run.log_artifact(folder, model_dest)
        best_val = state.best_val if state.best_step >= 0 else float("nan")
        if unit == method:
            results[method] = {
                "best_val_acc": best_val,
                "final_train_loss": state.history[-1]["train_loss"] if state.history else float("nan"),
            }
        if not ctx.is_main:
            # under torchrun only rank 0 validates (and selects); the others would only print "val acc nan"
            return best_val
        log(f"meta-train: {unit}: {state.step} steps, kept {used}, val acc {best_val:.3f}")
        if best_val < val_chance + 0.02:
            at_chance.append(unit)
            log(
                f"meta-train: WARNING {unit}: validation accuracy {best_val:.3f} never left chance ({val_chance:.3f}); "
                "the kept weights are the last of the tied steps and show no measurable learning: raise "
                "outer.steps, check inner.lr (docs/evaluation.md, 'Stable MAML settings') or the data"
            )
        return best_val

    for i, method in enumerate(cfg.methods):
        for j, base_seed in enumerate(cfg.seeds):
            # The first seed's model is THE model of the method (models/<method>, registered, adapted);
            # the other seeds' models only serve evaluate's verdicts across seeds (seeds/<method>/<seed>).
            unit = method if j == 0 else f"{method}.seed{base_seed}"
            model_dest = f"models/{method}" if j == 0 else f"seeds/{method}/{base_seed}"
            seed_vals.setdefault(method, []).append(_train_one(method, i, base_seed, unit, model_dest))

    write_json_atomic(run.outdir / "curves.json", curves)
    primary = cfg.methods[0]
    version = run.register_model(f"models/{primary}", reg_name, "latest")
    n_params = count_parameters(build_model(cfg.model, image_shape[0], image_shape[1:]))

    def _val(m: str) -> str:
        v = seed_vals[m]
        return f"{m} {v[0]:.3f}" + (f" (seeds {min(v):.3f}-{max(v):.3f})" if len(v) > 1 else "")

    summary = (
        f"trained {', '.join(cfg.methods)} x {len(cfg.seeds)} seed(s) ({cfg.outer.steps} steps x {cfg.meta_batch} "
        f"tasks, {cfg.model.backbone} {n_params} params, {cfg.model.norm} norm, {device}); val acc "
        + ", ".join(_val(m) for m in results)
        + f"; registered {reg_name} v{version} ({primary}, seed {cfg.seeds[0]})"
        + (f"; AT CHANCE on validation: {', '.join(at_chance)}" if at_chance else "")
    )
    metrics = {f"{m}.best_val_acc": r["best_val_acc"] for m, r in results.items()}
    # NaN when no seed was validated (no validation episodes; ranks > 0 under torchrun never validate),
    # without numpy's "Mean of empty slice" warning on the terminal
    metrics.update(
        {
            f"{m}.best_val_acc_seed_mean": float(np.mean([x for x in v if not np.isnan(x)]))
            if any(not np.isnan(x) for x in v)
            else float("nan")
            for m, v in seed_vals.items()
        }
    )
    return StageResult(summary=summary, metrics=metrics)
