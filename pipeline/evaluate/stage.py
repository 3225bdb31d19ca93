"""`fewscan evaluate`: a meta-train run → results.json, report.md, plots/*.png (an MLflow run tagged
fewscan.stage=evaluate). Thin: loads the upstream artifacts, calls `evaluation.run`, writes and logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.artifacts import ResultsFile, SplitFile, read_artifact, write_artifact
from pipeline.cpus import torch_threads
from pipeline.episodes.batch import episode_arrays
from pipeline.episodes.episode import load_episodes
from pipeline.errors import ConfigError, DataError, UpstreamError
from pipeline.evaluate import evaluation, plots, report
from pipeline.evaluate.config import EvaluateConfig

# the command-line hooks live in options.py (no torch: the CLI validates before importing it)
from pipeline.evaluate.options import add_arguments as add_arguments
from pipeline.evaluate.options import overrides_from_args as overrides_from_args
from pipeline.ingest.store import ImageStore
from pipeline.meta.device import pick_device
from pipeline.meta.model_io import META_FILE, load_meta_model
from pipeline.names import metric_key
from pipeline.progress import log
from pipeline.protocols import RunLike
from pipeline.tracking import StageResult, UpstreamRun

CONFIG = EvaluateConfig


def run_name(cfg: EvaluateConfig) -> str:
    """e.g. "evaluate all methods seeds=0,1,2 max=600"."""
    methods = ",".join(cfg.methods) if cfg.methods else "all methods"
    cap = f" max={cfg.max_episodes}" if cfg.max_episodes else ""
    return f"evaluate {methods} seeds={','.join(map(str, cfg.seeds))}{cap}"


def _meta_models(models_dir: Path, wanted: list[str] | None, device: Any) -> dict[str, Any]:
    if not models_dir.is_dir():
        raise DataError(f"the meta-train run has no models/ folder ({models_dir}); did meta-training finish?")
    found = sorted(p.name for p in models_dir.iterdir() if (p / META_FILE).is_file())
    if not found:
        raise DataError(f"no trained model under {models_dir} (expected models/<method>/{META_FILE})")
    if wanted:
        unknown = [m for m in wanted if m not in found]
        if unknown:
            raise ConfigError(
                f"evaluate.methods lists {unknown}, not trained in this run; valid: {', '.join(found)}"
            )
        found = [m for m in found if m in wanted]
    return {name: load_meta_model(models_dir / name, device=device) for name in found}


def _seed_models(mt: UpstreamRun, methods: list[str], device: Any) -> dict[str, dict[int, Any]]:
    """The further meta-training seeds' models (`seeds/<method>/<seed>/`); none for single-seed runs."""
    try:
        root = mt.artifact("seeds")
    except UpstreamError:
        return {}
    out: dict[str, dict[int, Any]] = {}
    for m in methods:
        folder = root / m
        if not folder.is_dir():
            continue
        for sub in sorted(folder.iterdir()):
            if (sub / META_FILE).is_file() and sub.name.isdigit():
                out.setdefault(m, {})[int(sub.name)] = load_meta_model(sub, device=device)
    return out


def load_inputs(cfg: EvaluateConfig, upstream: dict[str, UpstreamRun]) -> evaluation.Inputs:
    mt = upstream["meta-train"]
    ep = mt.upstream("episodes")
    ing = ep.upstream("ingest")
    device = pick_device(cfg.device)
    store = ImageStore.open(ing.artifact("store"))
    meta_models = _meta_models(mt.artifact("models"), cfg.methods, device)
    return evaluation.Inputs(
        meta_models=meta_models,
        meta_seed_models=_seed_models(mt, list(meta_models), device),
        val=load_episodes(ep.artifact("episodes/val.jsonl")),
        test=load_episodes(ep.artifact("episodes/test.jsonl")),
        # through split.json's model: a split of another fewscan version fails here, naming the field
        split=read_artifact(SplitFile, ep.artifact(SplitFile.FILE)),
        store=store,
        load=lambda e: episode_arrays(e, store, device),
        provenance={"meta_train_run": mt.run_id, "episodes_run": ep.run_id, "ingest_run": ing.run_id},
        device=device,
    )


def write_outputs(results: dict[str, Any], outdir: Path) -> ResultsFile:
    """plots/*.png, results.json, report.md into outdir (JSON and report written atomically). results.json
    goes through its model (pipeline/artifacts.py), so what is written is what its readers parse."""
    typed = ResultsFile.of(results)
    typed.plots = results["plots"] = plots.write_all(typed, outdir)
    write_artifact(outdir / ResultsFile.FILE, typed, indent=1)
    atomic.write_text(outdir / "report.md", report.render(typed))
    return typed


def headline(results: ResultsFile) -> str:
    """One line per run: each group's winner, its episode CI and, when present, which leads the patient-level
    bootstrap does not support (else whether the episode intervals overlap)."""
    parts = []
    for gk, comp in results.comparisons.items():
        w = comp["winner"]
        a = comp["acc"][w]
        ci = f"±{a['ci95'] * 100:.1f}" if a["ci95"] is not None else ""
        pat = (comp.get("acc_patient") or {}).get(w)
        if pat:
            tied = [m for m, v in comp["vs_winner"].items() if not v["paired_diff_patient"]["excludes_zero"]]
            note = f" (patient CI {pat['low'] * 100:.1f}-{pat['high'] * 100:.1f}%; " + (
                f"lead not supported over {','.join(tied)})" if tied else "lead supported over all)"
            )
        else:
            tied = [m for m, v in comp["vs_winner"].items() if v["overlap"]]
            note = f" (overlaps {','.join(tied)})" if tied else " (separated)"
        parts.append(f"{gk}: {w} {a['mean'] * 100:.1f}{ci}%" + note)
    n = sum(results.setup.n_test_episodes.values())
    return f"{len(results.methods)} methods on {n} test episodes; " + "; ".join(parts)


def execute(cfg: EvaluateConfig, run: RunLike, upstream: dict[str, UpstreamRun]) -> StageResult:
    # Threads sized from the CPUs this process may use, and restored afterwards so that the setting does
    # not leak into whatever runs next in this process (docs/scaling.md, "CPU threads and worker pools").
    with torch_threads(cfg.threads):
        return _execute(cfg, run, upstream)


def _execute(cfg: EvaluateConfig, run: RunLike, upstream: dict[str, UpstreamRun]) -> StageResult:
    inputs = load_inputs(cfg, upstream)
    run.log_params(
        {
            "methods": sorted(inputs.meta_models)
            + [m for m in ("finetune", "scratch") if getattr(cfg, m).enabled],
            "n_val_episodes_file": len(inputs.val),
            "n_test_episodes_file": len(inputs.test),
            "device": str(inputs.device),
        }
    )
    log(
        f"evaluate: {len(inputs.test)} test / {len(inputs.val)} validation episodes, methods {sorted(inputs.meta_models)}"
    )
    results = evaluation.run(inputs, cfg)
    for w in results.get("warnings") or []:
        log(f"evaluate: WARNING: {w}")
    typed = write_outputs(results, run.outdir)
    chosen = {
        metric_key("chosen", m, *gk.split(".")): {k: v for k, v in sel["chosen"].items() if k != "val_acc"}
        for m, by_seed in typed.selection.items()
        for gk, sel in next(iter(by_seed.values())).items()
    }
    run.log_params(chosen)
    # logged by the framework with the run (names: test.<method>.<kind>.k<k>.<metric>)
    return StageResult(summary=headline(typed), metrics=evaluation.key_metrics(results))
