"""The model registry: registering a run's model as a new version, moving its alias once the run has
FINISHED (docs/adapt.md, "Registered name"), and turning a model reference (`models:/NAME@ALIAS`, a run
id, ...) into the run it came from."""

from __future__ import annotations

import contextlib
import re
from functools import partial
from typing import Any

from mlflow.exceptions import MlflowException

from pipeline.errors import TrackingError, UpstreamError
from pipeline.progress import log
from pipeline.tracking.store import client, retry, tracking_uri
from pipeline.tracking.tags import TAG_STAGE

DEFAULT_ALIAS = "current"  # MLflow reserves the alias "latest"


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_model_ref(ref: str) -> str:
    """A meta-train run id from a run id, `models:/name@alias`, `models:/name/3`, `name@alias` or `runs:/id/...`."""
    c = client()
    ref = ref.strip()
    if _RUN_ID.match(ref):
        return ref
    if ref.startswith("runs:/"):
        return ref[len("runs:/") :].split("/")[0]
    body = ref[len("models:/") :] if ref.startswith("models:/") else ref
    try:
        if "@" in body and body.split("@", 1)[1].lower() != "latest":
            name, alias = body.split("@", 1)
            mv = retry(lambda: c.get_model_version_by_alias(name, alias), "read the model registry")
        elif "@" in body or body.endswith("/latest") or "/" not in body:
            name = body.split("@", 1)[0] if "@" in body else body.removesuffix("/latest")
            return _newest_finished(name, ref)
        else:
            name, version = body.rsplit("/", 1)
            mv = retry(lambda: c.get_model_version(name, version), "read the model registry")
    except MlflowException:
        raise UpstreamError(
            f"model '{ref}' was not found in the registry of {tracking_uri()}. Give a meta-train run id, "
            "'models:/NAME@ALIAS', 'NAME@ALIAS' or 'models:/NAME/VERSION' (see the Models tab of `fewscan ui`)."
        ) from None
    if not mv.run_id:
        raise UpstreamError(f"registered model '{ref}' has no source run")
    return str(mv.run_id)


def _run_status(c: Any, run_id: str) -> str:
    info = c.get_run(run_id).info
    return "DELETED" if info.lifecycle_stage == "deleted" else str(info.status)


def _newest_finished(name: str, ref: str) -> str:
    """The run of the newest version of `name` whose run FINISHED (`NAME@latest`, `models:/NAME/latest` or a
    bare name). MLflow's own "latest" is the newest version whatever became of its run, and a run that
    failed after registering leaves its version behind (its alias does not move: `move_aliases`), so the
    newest version may hold a model that never finished training."""
    c = client()
    versions = retry(lambda: c.search_model_versions(f"name = '{name}'"), "read the model registry")
    if not versions:
        raise MlflowException(f"no versions of '{name}'")
    skipped: list[str] = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if not mv.run_id:
            continue
        try:
            status = str(retry(partial(_run_status, c, mv.run_id), "read a run"))
        except MlflowException:  # gone for good, or another user's run on a server (403)
            status = "UNREADABLE"
        if status == "FINISHED":
            if skipped:
                log(
                    f"model '{ref}': version {mv.version}, the newest whose run finished ({', '.join(skipped)} skipped)"
                )
            return str(mv.run_id)
        skipped.append(f"v{mv.version} {status.lower()}")
    raise UpstreamError(
        f"model '{ref}': no version of '{name}' comes from a finished run ({', '.join(skipped) or 'none has a run'}); "
        f"re-run the stage that registers it, or name a version with models:/{name}/VERSION"
    )


def register_version(run_id: str, artifact_uri: str, stage: str, artifact_path: str, name: str) -> str:
    """Register `<artifact_uri>/<artifact_path>` of run `run_id` as a new version of `name` (the registered
    model is created if missing); the version number. Aliases are moved separately (`move_aliases`)."""
    c = client()
    with contextlib.suppress(MlflowException):  # it exists already
        retry(lambda: c.create_registered_model(name), "create a registered model")
    source = f"{artifact_uri.rstrip('/')}/{artifact_path}"
    mv = retry(
        lambda: c.create_model_version(name, source, run_id=run_id, tags={TAG_STAGE: stage}),
        "register a model version",
    )
    return str(mv.version)


def alias_name(alias: str) -> str:
    """`alias`, or DEFAULT_ALIAS for "latest": MLflow reserves it (models:/NAME/latest already names the
    newest version)."""
    return DEFAULT_ALIAS if alias.lower() == "latest" else alias


def move_aliases(stage: str, run_id: str, pending: list[tuple[str, str, str]]) -> None:
    """Point each (name, alias, version) the run asked for at its version; called once the run is
    FINISHED. A failure here leaves the run FINISHED and says which alias did not move."""
    for name, alias, version in pending:
        try:
            retry(lambda: client().set_registered_model_alias(name, alias, version), "set a model alias")  # noqa: B023
        except MlflowException as err:
            raise TrackingError(
                f"{stage} run {run_id} FINISHED and registered {name} version {version}, but the alias "
                f"'{alias}' could not be moved to it ({err}). Set it in the Models tab of `fewscan ui`, or "
                f"use models:/{name}/{version}."
            ) from None
        log(f"{name}@{alias} -> version {version} (also models:/{name}/latest)")
