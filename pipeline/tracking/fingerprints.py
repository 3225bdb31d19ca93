"""A stage's fingerprint: the hash of what its result depends on (config, upstream runs, inputs, code set,
numerics). `fewscan run` reuses a FINISHED run with the same fingerprint (pipeline/tracking/reuse.py;
docs/CONTRACTS.md, "Tags"). No mlflow: hashing only."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline import codeset


def code_files(stage: str) -> tuple[str, ...]:
    """The package files (relative to pipeline/) the stage can execute, derived from the imports of its
    entry module (its StageSpec, pipeline/stage_configs.py): editing evaluate must not invalidate a
    finished ingest, and editing a C kernel must rerun meta-train (pipeline/codeset.py). () for a name
    that is no stage."""
    # imported here, not with the module: importing a stage (which imports this layer) must load no module
    # outside its code set other than the orchestration ones (tests/foundation/test_fingerprint_codeset.py)
    from pipeline import stage_configs

    if stage not in stage_configs.ORDER:
        return ()
    return codeset.code_files(stage_configs.spec(stage).entry_module)


def code_version(stage: str) -> str:
    """Hash of the stage's code set, paths and bytes (works without git, sees uncommitted edits)."""
    h = hashlib.sha256()
    for rel in code_files(stage):
        h.update(rel.encode() + b"\0")
        h.update((codeset.ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def numerics(stage: str, device: str = "auto") -> dict[str, str] | None:
    """Torch version, device type and CPU kernel build the stage computes with; None if it runs no engine."""
    return codeset.numerics(code_files(stage), device)


def fingerprint(
    stage: str,
    config: dict[str, Any],
    upstream_ids: dict[str, str],
    inputs: Any = None,
    *,
    device: str = "auto",
) -> str:
    """Hash of what a stage's result depends on: config, upstream runs, inputs, code set and numerics.
    `device` is the stage's `device` setting (auto / cpu / cuda[:N]) where it has one."""
    payload = {
        "stage": stage,
        "config": config,
        "upstream": dict(sorted(upstream_ids.items())),
        "code": code_version(stage),
        "numerics": numerics(stage, device),
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
