"""The tracking layer: the one package that talks to MLflow (docs/ARCHITECTURE.md, principle 2).

Everything the stages record goes through here, and stages are handed a `StageRun` and `UpstreamRun`s and
never import mlflow themselves (pipeline/serving.py and pipeline/adapt/fewscan_model.py, the adapted
model's pyfunc class and code file, are the exceptions: tests/foundation/test_mlflow_imports.py). One
module per job:

| module | job |
|---|---|
| `store.py` | where the store is, the one `MlflowClient`, the retry around SQLite's single-writer lock |
| `tags.py` | the tag keys on runs and experiments |
| `owners.py` | whose runs fewscan uses on a shared server: the user, the proof an experiment is theirs |
| `experiments.py` | experiment names, ids and scope, their look in the UI, UI links |
| `leases.py` | the lease of a RUNNING run; runs of dead processes marked KILLED |
| `fingerprints.py` | a stage's code set, numerics and fingerprint (hashing only) |
| `artifacts.py` | a run's artifacts as local paths: its own folder, or the download cache |
| `upstream.py` | `UpstreamRun`, the latest run of a stage, lineage |
| `reuse.py` | the run to reuse, to wait for (pipeline/claims.py), or to resume |
| `registry.py` | model versions, aliases, model references |
| `datasets.py` | tables recorded as dataset inputs |
| `runs.py` | `StageRun`, the open run a stage logs through; `StageResult` |
| `lifecycle.py` | `stage_run` / `chain_run`: a run from creation to FINISHED, FAILED or KILLED |
| `inventory.py` | the store as `fewscan gc` sees it, and removing a run (pipeline/gc_runs.py) |

Callers use the names below (`from pipeline import tracking; tracking.stage_run(...)`). A test that
replaces one of them replaces it in the module that defines it (`tracking.store`, `tracking.owners`, ...):
the modules here call each other there, not through this package.
"""

from __future__ import annotations

from mlflow.entities import RunStatus

from pipeline.tracking import (
    artifacts,
    datasets,
    experiments,
    fingerprints,
    inventory,
    leases,
    lifecycle,
    owners,
    registry,
    reuse,
    runs,
    store,
    tags,
    upstream,
)
from pipeline.tracking.artifacts import artifact_path, cache_root, download_cache, local_artifact_dir
from pipeline.tracking.experiments import (
    experiment_id,
    experiment_name,
    experiment_url,
    present_experiment,
    run_url,
    search_scope,
    set_experiment_tag,
    ui_base,
    ui_lines,
)
from pipeline.tracking.fingerprints import code_files, code_version, fingerprint, numerics
from pipeline.tracking.leases import LEASE_TIMEOUT_S, lease_gone, lease_tags, reap_dead_runs
from pipeline.tracking.lifecycle import (
    chain_run,
    create_stage_run,
    run_status,
    set_run_tag,
    stage_run,
    stage_tags,
    withdraw_run,
)
from pipeline.tracking.owners import is_owned, owner_key_file, runs_filter, server_user
from pipeline.tracking.registry import DEFAULT_ALIAS, resolve_model_ref
from pipeline.tracking.reuse import find_reusable, latest_unfinished, running_with_fingerprint, started_with
from pipeline.tracking.runs import StageResult, StageRun
from pipeline.tracking.store import (
    DEFAULT_ARTIFACTS,
    DEFAULT_DB,
    client,
    default_artifact_root,
    is_default_store,
    retry,
    tracking_uri,
)
from pipeline.tracking.tags import (
    TAG_CHAIN,
    TAG_CODE,
    TAG_DATASET,
    TAG_ERROR,
    TAG_FINGERPRINT,
    TAG_HEARTBEAT,
    TAG_HOST,
    TAG_NOTE,
    TAG_NUMERICS,
    TAG_OWNER,
    TAG_OWNER_PROOF,
    TAG_PARENT,
    TAG_PID,
    TAG_STAGE,
    TAG_SUITE,
    TAG_UPSTREAM,
    TAG_USER,
    TAG_VERSION,
)
from pipeline.tracking.upstream import UpstreamRun, latest_run, lineage, resolve_upstream

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_ARTIFACTS",
    "DEFAULT_DB",
    "LEASE_TIMEOUT_S",
    "TAG_CHAIN",
    "TAG_CODE",
    "TAG_DATASET",
    "TAG_ERROR",
    "TAG_FINGERPRINT",
    "TAG_HEARTBEAT",
    "TAG_HOST",
    "TAG_NOTE",
    "TAG_NUMERICS",
    "TAG_OWNER",
    "TAG_OWNER_PROOF",
    "TAG_PARENT",
    "TAG_PID",
    "TAG_STAGE",
    "TAG_SUITE",
    "TAG_UPSTREAM",
    "TAG_USER",
    "TAG_VERSION",
    "RunStatus",
    "StageResult",
    "StageRun",
    "UpstreamRun",
    "artifact_path",
    "artifacts",
    "cache_root",
    "chain_run",
    "client",
    "code_files",
    "code_version",
    "create_stage_run",
    "datasets",
    "default_artifact_root",
    "download_cache",
    "experiment_id",
    "experiment_name",
    "experiment_url",
    "experiments",
    "find_reusable",
    "fingerprint",
    "fingerprints",
    "inventory",
    "is_default_store",
    "is_owned",
    "latest_run",
    "latest_unfinished",
    "lease_gone",
    "lease_tags",
    "leases",
    "lifecycle",
    "lineage",
    "local_artifact_dir",
    "numerics",
    "owner_key_file",
    "owners",
    "present_experiment",
    "reap_dead_runs",
    "registry",
    "resolve_model_ref",
    "resolve_upstream",
    "retry",
    "reuse",
    "run_status",
    "run_url",
    "runs",
    "runs_filter",
    "running_with_fingerprint",
    "search_scope",
    "server_user",
    "set_experiment_tag",
    "set_run_tag",
    "stage_run",
    "stage_tags",
    "started_with",
    "store",
    "tags",
    "tracking_uri",
    "ui_base",
    "ui_lines",
    "upstream",
    "withdraw_run",
]
