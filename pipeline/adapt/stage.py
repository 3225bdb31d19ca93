"""`fewscan adapt`: a meta-model + a few labelled scans of a new condition -> a registered, servable model.

1. The meta-model: `models/<method>` of the upstream meta-train run, with the facts of the ingest it was
   trained on (preprocessing, modalities, normal label, salt id), recorded in its `meta_model.json` by
   meta-train: adapt reads no other run.
2. The support set (and optional query set): every scan through that preprocessing; unreadable scans
   are reported and skipped if every class keeps `min_per_class`; a scan of another modality/geometry
   refuses the set.
3. The one inner loop (`MetaModel.method(...).fit`) with a class-balanced support loss, steps/lr from the
   meta-model (its validated `eval_steps`) unless overridden; the support loss and accuracy after every
   step are logged as metric curves. A binary model then gets its decision threshold on p(condition),
   chosen on the support scans (decision.py; docs/adapt.md).
4. With a query set: balanced accuracy, sensitivity, specificity, AUC and accuracy of the adapted model
   (and of the unadapted one, for comparison); scans also present in the support set are left out of
   these. A model that predicts one class for every query scan, or never the condition, is called out
   (WARNING in the log and the summary).
5. The adapted model as an MLflow pyfunc (`adapted_model`), registered as
   `fewscan-<suite>-<condition>-<hash>` (unique per suite and condition; its alias moves when the run
   finishes): a model from code (fewscan_model.py) + the `adapted` folder of plain tensors, nothing
   pickled (docs/CONTRACTS.md).

No file name or path reaches MLflow: scans are salted content hashes, config paths are hashed. Nor does
one reach stderr: log lines name a file by its salted file key, and `<local_report_dir>/adapt.paths.json`
(local only, next to the salt) maps each key to the clear path; `adapt-<run id>.json` there lists the
rejected scans with their paths.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.adapt import decision as D
from pipeline.adapt.adapted import AdaptedClassifier, save_adapted, torch_threads
from pipeline.adapt.config import AdaptConfig

# the command-line hooks live in options.py (no torch: the CLI validates before importing it)
from pipeline.adapt.options import TIED_TO as TIED_TO
from pipeline.adapt.options import add_arguments as add_arguments
from pipeline.adapt.options import compose_section as compose_section
from pipeline.adapt.options import overrides_from_args as overrides_from_args
from pipeline.adapt.support import (
    LabelledSet,
    PathLedger,
    ScanSpec,
    list_labelled,
    load_labelled,
    order_classes,
    write_json_atomic,
)
from pipeline.errors import ConfigError, DataError, UpstreamError
from pipeline.evaluate import metrics as M
from pipeline.ingest.deid import load_or_create_salt, salt_id, salted_key
from pipeline.meta.methods import Adapted, FewShotMethod, class_balanced_cross_entropy
from pipeline.meta.model_file import IngestFacts
from pipeline.meta.model_io import MetaModel, load_meta_model
from pipeline.progress import log
from pipeline.protocols import RunLike
from pipeline.tracking import StageResult, UpstreamRun

CONFIG = AdaptConfig
DEFAULT_NORMAL = "No Finding"
# In local_report_dir (next to the salt, never uploaded): file key -> clear path of every file a log line names.
LEDGER_FILE = "adapt.paths.json"
# The model's code file imports the installed fewscan (the model carries no copy of it, see
# fewscan_model.py); so does predict. A fewscan model runs its code from the installed package.
MODEL_CODE = Path(__file__).with_name("fewscan_model.py")
# For the fingerprint's code set (pipeline/codeset.py): MODEL_CODE is read, not imported, yet it is code.
CODE_DEPENDENCIES = ["fewscan_model.py"]
# Distributions the adapted pyfunc imports (pinned to this environment's versions); listing them
# explicitly skips MLflow's requirement inference, which loads the model in a subprocess (seconds).
# fewscan first: a serving environment must have it (MLflow warns on load when its version differs).
_RUNTIME_DISTS = (
    "fewscan",
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "pydantic",
    "pyyaml",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "pillow",
    "nibabel",
    "monai",
    "tqdm",
)


def run_name(cfg: AdaptConfig) -> str:
    return f"adapt {cfg.condition or 'new condition'}" + (f" ({cfg.method})" if cfg.method else "")


# Knobs that do not change the adapted model: changing them must not force a re-adaptation in `fewscan run`.
FINGERPRINT_EXCLUDE = ("threads", "batch_size", "local_report_dir")


def public_config(cfg: AdaptConfig) -> dict[str, Any]:
    """The config as logged to MLflow: the support/query paths only as salted hashes (a folder name may
    name a patient); the sets' content enters the fingerprint through `fingerprint_inputs`."""
    out = cfg.model_dump(mode="json")
    salt = load_or_create_salt(cfg.salt_file)
    for key in ("support", "query"):
        v = getattr(cfg, key)
        if v is not None:
            out[key] = "path:" + salted_key(salt, "adapt-config-path", str(Path(v).resolve()))
    return out


def _listing_digest(root: Path | None) -> str | None:
    """Digest of a set's file listing (relative names, sizes, mtimes): changes when the set changes."""
    if root is None:
        return None
    root = Path(root)
    h = hashlib.sha256()
    if root.is_file():
        st = root.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}:".encode())
        h.update(root.read_bytes())
        return h.hexdigest()[:16]
    if not root.is_dir():
        return "missing"
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fingerprint_inputs(cfg: AdaptConfig) -> dict[str, str | None]:
    """The support/query content enters the fingerprint, so `fewscan run` re-adapts after the set changes."""
    return {"support": _listing_digest(cfg.support), "query": _listing_digest(cfg.query)}


# ------------------------------------------------------------------------------------ meta-model
def choose_method(mt: UpstreamRun, requested: str | None) -> tuple[str, Path]:
    """(method name, local models/<method> folder) of the meta-train run."""
    try:
        models = mt.artifact("models")
    except UpstreamError:
        raise UpstreamError(
            f"meta-train run {mt.run_id} has no models/ artifact (did it finish meta-training?); "
            "pass another meta-model with --model"
        ) from None
    available = sorted(d.name for d in models.iterdir() if (d / "meta_model.json").is_file())
    if not available:
        raise UpstreamError(f"meta-train run {mt.run_id} holds no meta-model under models/")
    if requested:
        if requested not in available:
            raise ConfigError(
                f"meta-train run {mt.run_id} has no method '{requested}'; it has: {', '.join(available)}"
            )
        return requested, models / requested
    primary = _primary_method(mt.params, available)
    if primary is None:
        raise ConfigError(
            f"meta-train run {mt.run_id} holds several methods ({', '.join(available)}); choose one with "
            "--method NAME (adapt.method)"
        )
    return primary, models / primary


def _primary_method(params: dict[str, str], available: list[str]) -> str | None:
    """The first method of the meta-train config that has a saved model (the registered one)."""
    for key in ("methods", "method"):
        raw = params.get(key)
        if not raw:
            continue
        try:
            listed = json.loads(raw)
        except json.JSONDecodeError:
            listed = raw
        for name in [listed] if isinstance(listed, str) else list(listed):
            name = name.get("name") if isinstance(name, dict) else name
            if name in available:
                return str(name)
    return available[0] if len(available) == 1 else None


def ingest_facts(mm: MetaModel) -> IngestFacts:
    """The ingest facts the meta-model records (meta_model.json `ingest`, pipeline/meta/model_file.py)."""
    facts = mm.meta.ingest
    if facts is None or not facts.preprocessing:
        raise UpstreamError(
            "the meta-model records no ingest facts (meta_model.json 'ingest': preprocessing, modalities, salt "
            "id; written by meta-train since meta_model.json schema_version 2), so it cannot read new scans "
            "the way its training data was read. It was trained by an older fewscan: re-run meta-train with "
            "this fewscan"
        )
    return facts


def scan_spec(mm: MetaModel, facts: IngestFacts) -> ScanSpec:
    """How to read a new scan for this meta-model: its ingest preprocessing, input shape and modalities
    (none recorded: the modality is not checked)."""
    return ScanSpec(
        preprocessing=dict(facts.preprocessing),
        shape=tuple(mm.image_shape),
        modalities=frozenset(facts.modalities) or None,
    )


# ------------------------------------------------------------------------------------ adaptation
def fit_curve(
    method: FewShotMethod, x: torch.Tensor, y: torch.Tensor, n_way: int, steps: int
) -> list[Adapted]:
    """States after 0..steps inner steps of ONE adaptation run; the last one is the adapted model.

    Uses the method's `fit_trajectory` (the engine's `GradientMethod` runs the one inner loop once with
    `trajectory=True`), so the curve costs one adaptation instead of steps*(steps+1)/2 inner steps.
    ProtoNet has no inner steps: one state.
    """
    traj = getattr(method, "fit_trajectory", None)
    if traj is not None:
        return list(traj(x, y, n_way, steps))
    return [method.fit(x, y, n_way, steps=steps)]


def _nll(probs: np.ndarray, y: np.ndarray, balanced: bool = False) -> float:
    """Mean negative log-likelihood; `balanced`: the mean over classes of each class's mean (the loss the
    class-balanced inner loop minimises)."""
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))
    if not balanced:
        return float(np.mean(nll))
    return float(np.mean([nll[y == c].mean() for c in np.unique(y)]))


def _confusion(pred: np.ndarray, y: np.ndarray, n_way: int) -> list[list[int]]:
    """(n_way, n_way) counts, rows = true class, columns = predicted class (by the model's decision rule)."""
    return np.bincount(y * n_way + pred, minlength=n_way * n_way).reshape(n_way, n_way).tolist()


def query_metrics(probs: np.ndarray, y: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """Balanced accuracy, sensitivity, specificity, accuracy, AUC; the condition (index 0) is the positive
    class. Predicted classes by the model's rule: p(condition) >= `threshold` for a binary model with one,
    else the argmax. `predicted_one_class` is 1.0 when every scan got the same predicted class."""
    pred = D.predicted_index(probs, threshold)
    out: dict[str, float] = {
        "balanced_accuracy": M.balanced_accuracy(pred, y),
        "accuracy": float(np.mean(pred == y)) if len(y) else float("nan"),
        "n": float(len(y)),
        "predicted_one_class": float(len(np.unique(pred)) == 1),
    }
    # condition vs the rest: for 2 classes this is the ordinary binary AUC / sens / spec
    auc = M.binary_auc(probs[:, 0], y == 0)
    if auc is not None:
        out["auc"] = auc
    if probs.shape[1] > 2:
        macro = M.macro_auc(probs, y)
        if macro is not None:
            out["auc_macro"] = macro
    sens, spec = M.condition_sensitivity_specificity(pred, y)
    if sens is not None:
        out["sensitivity"] = sens
    if spec is not None:
        out["specificity"] = spec
    return out


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in _RUNTIME_DISTS:
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def _patient_keys(refs_paths: list[Path], salt: bytes) -> set[str]:
    """Salted patient keys (ingest's scheme) of DICOM files; non-DICOM files have none."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    keys = set()
    for p in refs_paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["PatientID"])
        except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
            continue
        pid = str(getattr(ds, "PatientID", "") or "").strip()
        if pid:
            keys.add(salted_key(salt, "patient", pid))
    return keys


def execute(cfg: AdaptConfig, run: RunLike, upstream: dict[str, UpstreamRun]) -> StageResult:
    with torch_threads(cfg.threads):
        return _execute(cfg, run, upstream)


def _execute(cfg: AdaptConfig, run: RunLike, upstream: dict[str, UpstreamRun]) -> StageResult:
    from pipeline.meta.device import pick_device
    from pipeline.serving import ARTIFACT_KEY, INPUT_EXAMPLE, MODEL_ARTIFACT, MODEL_CODE_FILE, model_signature

    mt = upstream["meta-train"]
    method_name, mm_dir = choose_method(mt, cfg.method)
    mm = load_meta_model(mm_dir, device=pick_device())
    facts = ingest_facts(mm)
    spec = scan_spec(mm, facts)
    normal = facts.normal_label or mm.meta.normal_label or DEFAULT_NORMAL
    salt = load_or_create_salt(cfg.salt_file)
    # stderr names a file only by its salted key; this local-only file maps keys back to clear paths
    ledger = PathLedger(salt, Path(cfg.local_report_dir) / LEDGER_FILE)

    # ---- support (and query) sets
    refs = list_labelled(cfg.support, "support", ledger)
    classes = order_classes([str(r.label) for r in refs], cfg.condition, normal)
    condition = classes[0]
    support = load_labelled(refs, classes, spec, salt, cfg.min_per_class, "support", ledger=ledger)
    query: LabelledSet | None = None
    if cfg.query is not None:
        qrefs = list_labelled(cfg.query, "query", ledger)
        query = load_labelled(qrefs, classes, spec, salt, 0, "query", ledger=ledger)
        if len(query.keys) == 0:
            raise DataError("no readable scan in the query set (listed above); fix it or leave --query out")

    # ---- adapt: the one inner loop, with the support loss after every step
    loss_fn = class_balanced_cross_entropy if cfg.class_balanced else None
    method = mm.method(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, loss_fn=loss_fn)
    steps = int(cfg.steps if cfg.steps is not None else getattr(method, "steps", 0))
    steps_from = "adapt.steps" if cfg.steps is not None else "the meta-model's validated eval_steps"
    n_way = len(classes)
    # torch.func.grad imports torch._dynamo lazily on its first call (1-5 s on this machine): a load cost,
    # paid here so that adapt_seconds is the adaptation's compute (stage_seconds still includes it).
    import torch._dynamo  # noqa: F401

    torch.manual_seed(cfg.seed)  # nothing in the MAML family samples here; explicit for any method that does
    t0, c0 = time.perf_counter(), time.process_time()
    states = fit_curve(method, support.x, support.y, n_way, steps)
    adapted = states[-1]
    adapt_seconds = time.perf_counter() - t0
    # CPU seconds of this process (all its threads): on a shared machine wall time includes waiting
    adapt_cpu_seconds = time.process_time() - c0
    y_s = support.y.numpy()
    for s, st in enumerate(states):
        c = AdaptedClassifier(mm, method, st, classes, spec, card={})
        p = c.proba(support.x, cfg.batch_size)
        run.log_metrics(
            {"support_loss": _nll(p, y_s, cfg.class_balanced), "support_accuracy": M.accuracy(p, y_s)}, step=s
        )

    # ---- the decision rule (binary: a threshold on p(condition), from the support scans only) and how it
    # does on held-out support scans (decision.py; docs/adapt.md, "Decision threshold")
    p_support = AdaptedClassifier(mm, method, adapted, classes, spec, card={}).proba(
        support.x, cfg.batch_size
    )
    t1 = time.perf_counter()
    rule = D.choose(cfg.threshold, method, support.x, support.y, classes, steps, p_support, cfg.cv_folds)
    clf = AdaptedClassifier(mm, method, adapted, classes, spec, card={"decision": rule})
    warnings: list[str] = []
    headline: dict[str, float] = {
        "adapt_seconds": adapt_seconds,
        "adapt_cpu_seconds": adapt_cpu_seconds,
        "cv_seconds": time.perf_counter() - t1,
        "support_scans": float(len(support.keys)),
        "support_rejected": float(len(support.rejected)),
        "support_loss_final": _nll(p_support, y_s, cfg.class_balanced),
    }
    if clf.threshold is not None:
        headline["threshold"] = clf.threshold
        log(f"adapt: predicts '{condition}' when p({condition}) >= {clf.threshold:.4f} ({rule['chosen_by']})")
    for key in ("balanced_accuracy", "sensitivity", "specificity"):
        if rule.get(f"cv_{key}") is not None:
            headline[f"support_cv_{key}"] = float(rule[f"cv_{key}"])
    if "support_cv_balanced_accuracy" in headline:
        log(
            f"adapt: on held-out support scans ({rule['cv_how']}) balanced acc "
            f"{headline['support_cv_balanced_accuracy']:.3f}, sensitivity {headline['support_cv_sensitivity']:.3f}, "
            f"specificity {headline['support_cv_specificity']:.3f}"
        )
        if headline["support_cv_balanced_accuracy"] <= 0.5:
            warnings.append(
                f"on held-out support scans the adapted model did no better than chance (balanced acc "
                f"{headline['support_cv_balanced_accuracy']:.3f}): this support set gives no evidence that "
                f"it recognises '{condition}'"
            )
    for name, n in support.counts().items():
        log(f"support: {n} scan(s) of '{name}'")
    query_report: dict[str, Any] = {}
    if query is not None:
        in_support = set(support.keys)
        keep = [i for i, k in enumerate(query.keys) if k not in in_support]
        if len(keep) < len(query.keys):
            log(
                f"query: {len(query.keys) - len(keep)} scan(s) are also in the support set; left out of the metrics"
            )
        if not keep:
            raise DataError("every query scan is also in the support set: the query must hold other scans")
        xq, yq = query.x[keep], query.y.numpy()[keep]
        probs = clf.proba(xq, cfg.batch_size)
        qm = query_metrics(probs, yq, clf.threshold)
        # the unadapted network by its own rule (argmax): what adaptation changed
        q0 = query_metrics(AdaptedClassifier(mm, method, states[0], classes, spec, {}).proba(xq), yq)
        for k, v in qm.items():
            headline[f"query_{k}"] = v
        for k in ("balanced_accuracy", "sensitivity", "specificity", "accuracy", "auc"):
            if k in q0:
                headline[f"query_{k}_unadapted"] = q0[k]
        pred = clf.predicted(probs)
        if qm["predicted_one_class"]:
            only = classes[int(pred[0])]
            zero = "sensitivity" if only != condition else "specificity"
            warnings.append(f"the adapted model predicted '{only}' for every query scan ({zero} 0)")
        elif qm.get("sensitivity") == 0.0:
            warnings.append(f"sensitivity 0: no query scan of '{condition}' was predicted '{condition}'")
        # Patients, not only scans: a query patient seen in the support set (or in meta-training) makes
        # the query numbers optimistic. Keys use ingest's salt, so they are comparable only with the same salt.
        q_pat = _patient_keys([r.path for r in qrefs], salt)
        s_pat = _patient_keys([r.path for r in refs], salt)
        overlap_support = len(q_pat & s_pat)
        headline["query_patients_in_support"] = float(overlap_support)
        if overlap_support:
            log(
                f"query: {overlap_support} query patient(s) also appear in the support set: metrics are optimistic"
            )
        trained_on = mm.training_patients() if facts.salt_id == salt_id(salt) else None
        if trained_on:
            seen = len(q_pat & trained_on)
            headline["query_patients_in_meta_training_data"] = float(seen)
            if seen:
                log(
                    f"query: {seen} query patient(s) were in the meta-model's ingest data: metrics are optimistic"
                )
        query_report = {
            **query.report(),
            "metrics": qm,
            "metrics_unadapted": q0,
            "confusion_matrix": _confusion(pred, yq, n_way),
            "excluded_as_in_support": len(query.keys) - len(keep),
        }

    # ---- reports (de-identified) and the local one with clear paths
    write_json_atomic(run.outdir / "support_report.json", support.report())
    if query_report:
        write_json_atomic(run.outdir / "query_report.json", query_report)
    local = {"support": support.local_report(), "query": query.local_report() if query else None}
    local_path = Path(cfg.local_report_dir) / f"adapt-{run.run_id}.json"
    write_json_atomic(local_path, local, private=True)

    # ---- the adapted model: pyfunc + registry
    reg_name = cfg.registry_name(run.suite, condition)  # unique per suite and condition (pipeline/names.py)
    card = {
        "condition": condition,
        "normal_label": normal,
        "method": method_name,
        "steps": steps,
        "steps_from": steps_from,
        "lr": cfg.lr,  # None: the meta-model's own (learned) inner learning rate
        "loss": "class-balanced cross-entropy" if cfg.class_balanced else "cross-entropy",
        "decision": rule,
        "support_counts": support.counts(),
        "meta_train_run_id": mt.run_id,
        "ingest_run_id": facts.run_id,
        "adapt_run_id": run.run_id,
        "normalization": mm.meta.normalization,
    }
    with tempfile.TemporaryDirectory(prefix="fewscan-adapt-") as tmpname:
        tmp = Path(tmpname)
        folder = save_adapted(
            tmp / "adapted", meta_model_dir=mm_dir, adapted=adapted, classes=classes, spec=spec, card=card
        )
        # A model from code, not a pickled PythonModel: loading it never unpickles anything, and the model
        # carries no copy of the package (its code is the installed fewscan's; docs/CONTRACTS.md). The code
        # file is copied first so that the MLmodel records a temporary path, not where fewscan is installed.
        code = shutil.copy2(MODEL_CODE, tmp / MODEL_CODE_FILE)
        model_uri = run.log_pyfunc(
            MODEL_ARTIFACT,
            Path(code),
            artifacts={ARTIFACT_KEY: str(folder)},
            signature=model_signature(classes),
            # a request template, no scan: a real example would be a file path or pixels, neither for MLflow
            input_example=INPUT_EXAMPLE,
            pip_requirements=_pip_requirements(),
        )
    version = run.register_model(MODEL_ARTIFACT, reg_name, cfg.alias)
    run.set_tags(
        {
            "fewscan.adapt.condition": condition,
            "fewscan.adapt.classes": json.dumps(classes),
            "fewscan.adapt.method": method_name,
            "fewscan.adapt.registered": f"{reg_name}/{version}",
        }
    )
    run.log_params(
        {
            "resolved": {
                "method": method_name,
                "steps": steps,
                "steps_from": steps_from,
                "classes": classes,
                "n_way": n_way,
                "decision": rule,
            }
        }
    )
    for w in warnings:
        log(f"adapt: WARNING: {w}")
    log(f"adapt: local report with clear file paths (never uploaded): {local_path}")
    summary = summary_line(
        method_name,
        condition,
        support,
        steps,
        adapt_seconds,
        adapt_cpu_seconds,
        clf.threshold,
        headline,
        warnings,
    )
    return StageResult(
        summary=f"{summary}; registered {reg_name} v{version} -> {model_uri}", metrics=headline
    )


def summary_line(
    method_name: str,
    condition: str,
    support: LabelledSet,
    steps: int,
    seconds: float,
    cpu_seconds: float,
    threshold: float | None,
    m: dict[str, float],
    warnings: list[str],
) -> str:
    """adapt's one-line summary. It leads with the results: on the query set, balanced accuracy, sensitivity
    and specificity (with the unadapted model's), then AUC and plain accuracy last (on an imbalanced query
    set a model that predicts the majority class for every scan gets that class's share as accuracy), then
    any WARNING; without a query set, the same three on held-out support scans. Then how: the support set,
    steps, time, the decision threshold."""

    def trio(prefix: str, sfx: str = "", names: Sequence[str] = ("", "", "")) -> str:
        keys = ("balanced_accuracy", "sensitivity", "specificity")
        vals = [m.get(f"{prefix}{k}{sfx}") for k in keys]
        return ", ".join(f"{n}{'n/a' if v is None else f'{v:.3f}'}" for n, v in zip(names, vals))

    named = ("balanced acc ", "sensitivity ", "specificity ")
    out = f"adapted {method_name} to '{condition}': "
    if "query_balanced_accuracy" in m:
        out += f"query {trio('query_', '', named)}"
        if "query_balanced_accuracy_unadapted" in m:
            out += f" (unadapted {trio('query_', '_unadapted')})"
        if "query_auc" in m:
            out += f", AUC {m['query_auc']:.3f}"
            if "query_auc_unadapted" in m:
                out += f" (unadapted {m['query_auc_unadapted']:.3f})"
        out += f", accuracy {m['query_accuracy']:.3f} of {int(m['query_n'])} scans"
        if "support_cv_balanced_accuracy" in m:
            out += f"; held-out support balanced acc {m['support_cv_balanced_accuracy']:.3f}"
    elif "support_cv_balanced_accuracy" in m:
        out += f"held-out support {trio('support_cv_', '', named)} (no query set)"
    else:
        out += "no query set, no held-out estimate"
    out += "".join(f"; WARNING: {w}" for w in warnings)
    k = ", ".join(f"{c}: {n}" for c, n in support.counts().items())
    rej = f", {len(support.rejected)} unreadable skipped" if support.rejected else ""
    out += f"; from {len(support.keys)} scans ({k}{rej}) in {steps} steps, {seconds:.2f} s ({cpu_seconds:.2f} s CPU)"
    if threshold is not None:
        out += f", threshold p({condition}) >= {threshold:.3f}"
    return out


__all__ = [
    "CONFIG",
    "FINGERPRINT_EXCLUDE",
    "add_arguments",
    "compose_section",
    "execute",
    "fingerprint_inputs",
    "overrides_from_args",
    "public_config",
    "run_name",
]
